"""Build of the fused CPU kernels: ahead of time (``rmsnorm build``) or on first use, cached on disk.

- Cache: ``$TORCH_EXTENSIONS_DIR/<name>/`` (torch.utils.cpp_extension's layout, default
  ~/.cache/torch_extensions). ``stamp.txt`` records what the library was built from (source hash, flags,
  torch version, compiler path and date); when it matches, the library is imported directly, without
  running ninja, so switching between ninja binaries (a venv's and the system's) never forces a rebuild.
- Concurrency: a builder holds an exclusive ``flock`` on ``rmsnorm.lock`` in that folder. The operating
  system releases it when the process dies, so a build killed midway never blocks later processes; torch's
  own lock file, which a killed build leaves behind, is removed under it. A process that finds a live build
  waits, says so, and gives up after ``RMSNORM_BUILD_TIMEOUT`` seconds (default 900).
- Failures: one short line (``no C++ compiler: install g++ or set RMSNORM_CPU_BUILD=0 ...``); the full
  log goes to ``build.log`` and the failure is remembered in ``failed.txt`` for the same stamp, so new
  processes report it without retrying; ``rmsnorm build`` tries again.
- ``RMSNORM_CPU_BUILD=0`` disables the backend (the reference backend is used instead).

The kernels are compiled for the host's vector ISA (the capability torch itself dispatches to).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from ...host import silenced_output

SOURCE = Path(__file__).with_name("kernel.cpp")
ABI_VERSION = 5  # bump when the module's functions change

# Compile flags per torch CPU capability; ATen's Vectorized<> picks its implementation from the macros.
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}
_DEFAULT_FLAGS = ["-DCPU_CAPABILITY=DEFAULT"]

_lock = threading.Lock()
_state: dict[str, object] = {}


class BuildError(RuntimeError):
    """The CPU kernels cannot be built or loaded here; the message is one line, the details in ``detail``."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _FLAGS else "DEFAULT"


def _has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def flags() -> list[str]:
    """Compiler flags for this host: the vector ISA torch uses, plus AVX512-BF16 conversions if present."""
    cap = capability()
    out = list(_FLAGS.get(cap, _DEFAULT_FLAGS))
    if cap == "AVX512" and _has_avx512_bf16():
        out += ["-mavx512bf16", "-DRMSNORM_AVX512BF16"]
    return out


def extension_name() -> str:
    tag = capability().lower() + ("bf16" if "-DRMSNORM_AVX512BF16" in flags() else "")
    return f"rmsnorm_cpu_{tag}_v{ABI_VERSION}"


def build_directory() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(extension_name(), verbose=False))


def compiler() -> str | None:
    """Path of the C++ compiler torch's build would use ($CXX, else c++), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def stamp() -> str:
    """What a build depends on: the source, flags, torch, the compiler (path and date)."""
    cxx = compiler() or "none"
    try:
        cxx_date = str(os.stat(cxx).st_mtime_ns)
    except OSError:
        cxx_date = "?"
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (*flags(), torch.__version__, cxx, cxx_date, str(ABI_VERSION), sys.version.split()[0]):
        h.update(part.encode())
    return h.hexdigest()[:20]


def module():
    """The compiled extension module; builds it (or loads the cached build) on first call."""
    mod = _state.get("module")
    return mod if mod is not None else load()


def loaded():
    """The extension module if it is loaded in this process, else None (never builds)."""
    return _state.get("module")


def _library(directory: Path) -> Path | None:
    found = sorted(directory.glob(f"{extension_name()}*.so"))
    return found[0] if found else None


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(extension_name(), path)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import the CPU kernels from {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(force: bool = False, quiet: bool = False):
    """Load the cached build, or build it; return the extension module. ``force``: rebuild even after a
    remembered failure (``rmsnorm build``)."""
    with _lock:
        if "module" in _state and not force:
            return _state["module"]
        if os.environ.get("RMSNORM_CPU_BUILD", "1") == "0":
            raise BuildError("the CPU kernel build is disabled by RMSNORM_CPU_BUILD=0")
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        want = stamp()
        mod = None if force else _cached(directory, want)
        if mod is None:
            with _build_lock(directory):
                mod = None if force else _cached(directory, want)  # another process may have built it meanwhile
                if mod is None:
                    mod = _build(directory, want, quiet)
        return _adopt(mod)


def load_cached():
    """The extension module if it is loaded or a matching build is cached, else None (never builds: the GPU
    entry's C++ launches use the library only where it is already built, by ``rmsnorm build`` or a CPU call)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        if os.environ.get("RMSNORM_CPU_BUILD", "1") == "0":
            return None
        try:
            mod = _cached(build_directory(), stamp())
        except (BuildError, OSError, ImportError):
            return None
        return None if mod is None else _adopt(mod)


def _adopt(mod):
    """Finish loading ``mod`` for this process (the differentiable backward it calls back) and keep it."""
    from ... import composite

    mod.set_graph_backward(composite.graph_backward)
    _state["path"] = mod.__file__
    _state["module"] = mod
    return mod


def _cached(directory: Path, want: str):
    """The cached library if its stamp matches; raises the remembered failure for this stamp."""
    failed = directory / "failed.txt"
    if failed.exists():
        lines = failed.read_text().splitlines()
        if lines and lines[0] == want:
            raise BuildError(f"{lines[1] if len(lines) > 1 else 'the CPU kernel build failed'} (remembered from an "
                             f"earlier attempt; `rmsnorm build` tries again)", "\n".join(lines[2:]))
    lib = _library(directory)
    st = directory / "stamp.txt"
    if lib is not None and st.exists() and st.read_text().strip() == want:
        return _import(lib)
    return None


@contextlib.contextmanager
def _build_lock(directory: Path):
    timeout = float(os.environ.get("RMSNORM_BUILD_TIMEOUT", "900"))
    path = directory / "rmsnorm.lock"
    with open(path, "a+") as fh:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    print(f"rmsnorm: another process is building the CPU kernels in {directory}; waiting (at most "
                          f"{timeout:.0f} s)", file=sys.stderr, flush=True)
                    told = True
                if time.monotonic() - start > timeout:
                    raise BuildError(f"timed out after {timeout:.0f} s waiting for another process to build the "
                                     f"CPU kernels in {directory}") from None
                time.sleep(0.5)
        try:
            # torch's own lock file: a build killed midway leaves it; nobody else can be building now
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _short_reason(log: str) -> str:
    for needle in ("c++: not found", "not found", "Ninja is required", "error:", "Error"):
        for line in log.splitlines():
            if needle in line:
                return line.strip()[:200]
    return (log.strip().splitlines() or ["unknown error"])[-1][:200]


def _build(directory: Path, want: str, quiet: bool):
    from torch.utils.cpp_extension import load as cpp_load

    if compiler() is None:
        reason = ("no C++ compiler: install g++ or set RMSNORM_CPU_BUILD=0 for the reference backend "
                  f"(looked for {os.environ.get('CXX', 'c++')!r} on PATH)")
        _remember(directory, want, reason, reason)
        raise BuildError(reason)
    (directory / "stamp.txt").unlink(missing_ok=True)
    done = threading.Event()
    if not quiet:
        print(f"rmsnorm: compiling the fused CPU kernels for {capability()} (first use only; cached in "
              f"{directory}; `rmsnorm build` does this ahead of time)", file=sys.stderr, flush=True)
        # the ticker writes to the terminal's stderr, which the build's own output does not reach
        terminal = os.fdopen(os.dup(2), "w", buffering=1)
        threading.Thread(target=_ticker, args=(done, terminal), daemon=True).start()
    start = time.monotonic()
    try:
        # -fopenmp: at::parallel_for is inline OpenMP code; the library then shares torch's libgomp.so.1.
        with silenced_output():
            mod = cpp_load(name=extension_name(), sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp", *flags()],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:
        log = f"{type(exc).__name__}: {exc}"
        (directory / "build.log").write_text(log)
        reason = f"building the CPU kernels failed: {_short_reason(log)} (full log: {directory / 'build.log'})"
        _remember(directory, want, reason, log)
        raise BuildError(reason, log) from None
    finally:
        done.set()
    (directory / "failed.txt").unlink(missing_ok=True)
    (directory / "stamp.txt").write_text(want + "\n")
    if not quiet:
        print(f"rmsnorm: CPU kernels built in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return mod


def _remember(directory: Path, want: str, reason: str, log: str) -> None:
    with contextlib.suppress(OSError):
        (directory / "failed.txt").write_text(f"{want}\n{reason}\n{log}")


def _ticker(done: threading.Event, terminal) -> None:
    start = time.monotonic()
    with contextlib.suppress(OSError, ValueError):
        while not done.wait(15.0):
            print(f"rmsnorm: still compiling the CPU kernels ({time.monotonic() - start:.0f} s)", file=terminal,
                  flush=True)
        terminal.close()


def status() -> str:
    """One line for ``rmsnorm info``: which path is active."""
    if "path" in _state:
        return f"built for {capability()}, loaded from {_state['path']}"
    return f"not loaded (built for {capability()} on first use or by `rmsnorm build`; cache {build_directory()})"
