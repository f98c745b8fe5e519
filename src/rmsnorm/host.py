"""Facts about the host that bench, reproduce and the CLI report: the CPU model, the command line that
made a result, which malloc the process uses, and re-running a command under tcmalloc.

glibc's malloc returns large freed blocks to the kernel and page-faults them back on the next
allocation; on the 2-core development machine an allocating 256 MB copy runs at about a quarter of its
tcmalloc speed, and whole training steps of small models spend a third of their time in page faults.
Timings are only comparable under one allocator, and every table says which.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import platform
import shlex
import sys
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None when matplotlib is not installed (the
    figures are optional: the reports say what they would show)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def command_line(subcommand: str) -> str:
    """The ``rmsnorm SUBCOMMAND ...`` command this process runs, as typed (else just the subcommand)."""
    if sys.argv[1:2] == [subcommand]:
        return "rmsnorm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"rmsnorm {subcommand}"

TCMALLOC_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                       "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
                       "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")


def allocator() -> str:
    """The malloc in this process: tcmalloc / jemalloc / mimalloc when preloaded, else glibc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in maps:
            return name
    return "glibc malloc"


def find_tcmalloc() -> str | None:
    """Path of a tcmalloc shared library on this machine (Debian: libtcmalloc-minimal4), else None."""
    return next((c for c in TCMALLOC_CANDIDATES if Path(c).exists()), None) or ctypes.util.find_library(
        "tcmalloc_minimal")


def reexec_under_tcmalloc(lib: str) -> None:
    """Replace this ``rmsnorm <command> ...`` process by the same command with tcmalloc preloaded."""
    env = {**os.environ, "LD_PRELOAD": lib}
    os.execve(sys.executable, [sys.executable, "-m", "rmsnorm", *sys.argv[1:]], env)


def rerun_under_tcmalloc(command: str, *, required: bool) -> None:
    """Re-run this ``rmsnorm <command>`` process under tcmalloc unless it already runs under it. Without
    an installed tcmalloc: a clear exit when ``required``, else nothing (the current allocator stays)."""
    if "tcmalloc" in allocator():
        return
    lib = find_tcmalloc()
    if lib is None:
        if required:
            raise SystemExit(f"rmsnorm {command}: --allocator tcmalloc needs libtcmalloc "
                             "(Debian: libtcmalloc-minimal4)")
        return
    print(f"rmsnorm {command}: re-running under tcmalloc ({lib})", flush=True)
    reexec_under_tcmalloc(lib)


@contextlib.contextmanager
def silenced_output():
    """Nothing written to file descriptors 1 and 2 inside reaches the terminal: the CPU kernel build's own
    output (torch's banners, the compiler, ninja: torch puts what matters into the exception it raises), the
    profiler's C++ log lines."""
    fd = os.open(os.devnull, os.O_WRONLY)
    saved = [os.dup(1), os.dup(2)]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)
