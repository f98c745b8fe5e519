"""Just-in-time build of the fused CPU kernels, cached on disk.

The kernels are compiled for the host's vector ISA (the capability torch itself dispatches to) on
first use with torch.utils.cpp_extension, and cached under $TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions): later processes load the cached library in well under a second. The build
needs a C++ compiler and no network; without one, the backend reports itself unavailable and rmsnorm
falls back to the reference backend with one warning. ``RMSNORM_CPU_BUILD=0`` disables the build.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernel.cpp")
ABI_VERSION = 3  # bump when the module's functions change

# Compile flags per torch CPU capability; ATen's Vectorized<> picks its implementation from the macros.
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}
_DEFAULT_FLAGS = ["-DCPU_CAPABILITY=DEFAULT"]

_lock = threading.Lock()
_state: dict[str, object] = {}


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


def build_directory() -> str:
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(extension_name(), verbose=False)


def module():
    """The compiled extension module (``forward`` and ``backward``); builds it on first call."""
    mod = _state.get("module")
    return mod if mod is not None else load()


def load():
    """Build (or load the cached build of) the kernels; return the extension module."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        if os.environ.get("RMSNORM_CPU_BUILD", "1") == "0":
            raise RuntimeError("the CPU kernel build is disabled by RMSNORM_CPU_BUILD=0")
        from torch.utils.cpp_extension import load as cpp_load

        name = extension_name()
        directory = build_directory()
        if not any(Path(directory).glob(f"{name}*.so")):
            print(f"rmsnorm: compiling the fused CPU kernels for {capability()} (first use only, about "
                  f"30 s; cached in {directory})", file=sys.stderr, flush=True)
        # -fopenmp: at::parallel_for is inline OpenMP code; the library then shares torch's libgomp.so.1.
        mod = cpp_load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp", *flags()],
                       extra_ldflags=["-fopenmp"], verbose=False)
        from ... import composite

        mod.set_graph_backward(composite.graph_backward)
        _state["path"] = mod.__file__
        _state["module"] = mod
        return mod


def status() -> str:
    """One line for ``rmsnorm info``: which path is active."""
    if "path" in _state:
        return f"JIT-built for {capability()}, loaded from {_state['path']}"
    return f"not loaded (JIT build for {capability()} on first use, cache {build_directory()})"
