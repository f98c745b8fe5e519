"""Pre-bound launches of the Triton kernels: ``kernel[grid](*args, **consts)`` without Triton's per-call work.

A Triton launch through ``JITFunction.run`` costs 12-16 µs of host time (option parsing, the device and
stream lookups, specializing every argument, the cache key, launch metadata), about five times what the
launch itself costs (``CompiledKernel.run``: 2.8 µs; both measured with Triton's real launcher by
benchmarks/cuda_host_cost.py). :class:`Prebound` keeps, per specialization, the compiled kernel that
Triton's own path chose on the first launch, and launches it directly afterwards.

The cache key is finer than Triton's specialization (so a cached kernel is always the one Triton would
pick): the device, every constexpr and launch option, every scalar argument's value, and per tensor its
dtype and data pointer modulo 16 (Triton specializes ints on ==1, divisibility by 16 and int32 range,
pointers on 16-byte alignment, dtypes by type). Scalars by value cost a Triton launch per new value once
(a new M, say) and keep the key cheap to build.

Not pre-bound (Triton's own path every time): the interpreter (``TRITON_INTERPRET=1``), launches while a
Triton launch hook is set (profilers), and any Triton whose compiled kernels lack the launch fields used
here; a launch that fails to bind turns pre-binding off for the process.

:func:`cxx_launch` goes one step further for the eager entry (``entry.py``): a bound kernel as a C++
``TritonLaunch`` (``backends/cpu/kernel.cpp``), which the entry's C++ calls allocate for and launch with
``cuLaunchKernel``, no Python in between, where that library is already built (``rmsnorm build``; a GPU
call never compiles it). Its parameters are packed here as Triton's launcher packs them
(the specialized signature's non-constexpr arguments in order, then the global and profile scratch
pointers, both null); only Triton versions whose launcher does exactly that are served
(``CXX_TRITON_VERSIONS``: read in their sources, and checked byte for byte against Triton's own launch on
a stand-in libcuda by ``benchmarks/cuda_host_cost.py --check``, which a test runs), and only kernels
without scratch memory, clusters, cooperative or programmatic launches, or oversized shared memory.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

import torch

MAX_ENTRIES = 4096  # distinct launches remembered per kernel (then the cache starts over)
_enabled = [os.environ.get("TRITON_INTERPRET", "0") != "1"]
# device types whose kernels run compiled (not interpreted), launched pre-bound (benchmarks/cuda_host_cost.py
# adds "cpu" for its stand-in driver)
DEVICES = {"cuda"}


_triton: tuple | None = None


def _import_triton() -> tuple:
    global _triton
    from triton import knobs
    from triton.runtime import driver

    _triton = (knobs, driver)
    return _triton


def _hooked(rt: Any) -> bool:
    """Whether a launch hook is set (None, or Triton 3.9's empty HookChain, means none)."""
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _defaults(kernel: Any) -> dict:
    """The default values of a Triton kernel's parameters that have one."""
    import inspect

    fn = getattr(kernel, "fn", None)
    if fn is None:
        return {}
    return {name: prm.default for name, prm in inspect.signature(fn).parameters.items()
            if prm.default is not inspect.Parameter.empty}


class Bound:
    """One launch of one kernel specialization (grid, constexprs and launch options fixed):
    ``bound(*args)`` launches it. The first call goes through Triton's own path (which compiles and caches the
    kernel) and keeps the compiled kernel; later calls run it directly. The caller guarantees that every later
    call's arguments specialize as the first call's did (see :class:`Prebound` for what Triton looks at)."""

    __slots__ = ("bindable", "compiled", "consts", "device_type", "grid", "index", "kernel", "stream", "tail")

    def __init__(self, kernel: Any, grid: Sequence[int], consts: dict, device: torch.device) -> None:
        self.kernel, self.consts = kernel, consts
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.bindable = device.type in DEVICES
        self.device_type = device.type
        self.index = device.index
        self.compiled: Any = None
        self.tail: tuple = ()
        self.stream: Any = None

    def __call__(self, *args: Any) -> None:
        compiled = self.compiled
        if compiled is not None and direct():
            g = self.grid
            try:
                compiled.run(g[0], g[1], g[2], self.stream(self.index), compiled.function, compiled.packed_metadata,
                             None, None, None, *args, *self.tail)
                return
            except TypeError:  # a Triton whose launcher takes other arguments: its own path from now on
                _enabled[0] = False
        compiled = self.kernel[self.grid](*args, **self.consts)  # Triton's own path: compiles, caches, launches
        if self.compiled is None and self.bindable and _enabled[0]:
            active = (_triton or _import_triton())[1].active
            names = self.kernel.arg_names[len(args):]
            given = {**_defaults(self.kernel), **self.consts}  # constexprs left out take their defaults
            if all(hasattr(compiled, f) for f in ("run", "function", "packed_metadata")) and all(
                    n in given for n in names):
                if self.index is None:
                    self.index = active.get_current_device()
                self.stream = active.get_current_stream  # (the driver's; Triton keeps one per process)
                self.tail = tuple(given[n] for n in names)
                self.compiled = compiled


class Prebound:
    """``Prebound(kernel).launch(grid, args, consts, device)``: the same launch as ``kernel[grid](*args,
    **consts)``; ``args`` are the kernel's runtime arguments in order, ``consts`` its constexprs and launch
    options (num_warps) by name. One :class:`Bound` per key (below)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._cache: dict[tuple, Bound] = {}

    def launch(self, grid: Sequence[int], args: tuple, consts: dict, device: torch.device) -> None:
        if not _enabled[0] or device.type not in DEVICES:
            self.kernel[grid](*args, **consts)
            return
        key = (device, *grid, None, *consts.items(),
               *[(a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a for a in args])
        bound = self._cache.get(key)
        if bound is None:
            if len(self._cache) >= MAX_ENTRIES:
                self._cache.clear()
            bound = self._cache[key] = Bound(self.kernel, grid, consts, device)
        bound(*args)


CXX_TRITON_VERSIONS = {(3, 6), (3, 9)}  # Triton releases whose launcher packs parameters as cxx_launch does
_SCALARS = {"i1": "<b", "i8": "<b", "i16": "<h", "i32": "<i", "i64": "<q", "u1": "<B", "u8": "<B", "u16": "<H",
            "u32": "<I", "u64": "<Q", "fp32": "<f", "fp64": "<d"}
_MAX_SHARED = 228 * 1024  # above this Triton adds a launch attribute (oversized shared memory)
_cxx_state: list[Any] = []  # [the C++ module or None], once looked up


def _cxx_module() -> Any:
    """The C++ module that holds TritonLaunch (the cpu backend's library), or None where it cannot load."""
    if not _cxx_state:
        mod = None
        try:
            import triton

            version = tuple(int(v) for v in triton.__version__.split(".")[:2])
            if version in CXX_TRITON_VERSIONS:
                from ..cpu import build

                mod = build.load_cached()  # (built by `rmsnorm build` or a CPU call; never compiled from here)
        except (ImportError, ValueError):  # no Triton, an unusual version string: Python launches
            mod = None
        _cxx_state.append(mod if hasattr(mod, "TritonLaunch") else None)
    return _cxx_state[0]


def direct() -> bool:
    """Whether launches may bypass Triton's Python launcher now: pre-binding on and no launch hook set (a
    profiler's hooks see every launch: while one is set, launches take Triton's own path)."""
    return _enabled[0] and not _hooked((_triton or _import_triton())[0].runtime)


def cxx_launch(bound: Bound, args: Sequence[Any], sources: Sequence[torch.Tensor]) -> Any:
    """``bound``'s launch as a C++ ``TritonLaunch`` whose tensor parameters come from ``sources`` (by
    position, matched by identity with the tensors in ``args``, the arguments of a launch already made), or
    None where that cannot be done exactly (see the module docstring)."""
    compiled = bound.compiled
    if compiled is None or not _enabled[0]:
        return None
    mod = _cxx_module()
    meta = getattr(compiled, "metadata", None)
    src = getattr(compiled, "src", None)
    if mod is None or meta is None or src is None or not hasattr(compiled, "function"):
        return None
    launcher = compiled.run
    if (getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid", True)
            or getattr(meta, "launch_pdl", True) or getattr(meta, "global_scratch_size", 1)
            or getattr(meta, "profile_scratch_size", 1) or getattr(launcher, "gsan_enabled", False)
            or meta.shared > _MAX_SHARED or getattr(meta, "tensordesc_meta", None)):
        return None
    values = (*args, *bound.tail)
    names = bound.kernel.arg_names
    signature = src.signature
    if len(values) != len(names):
        return None
    items: list[bytes] = []  # the parameters in order
    slots: list[tuple[int, int]] = []
    for name, value in zip(names, values):
        ty = signature.get(name)
        if ty == "constexpr":
            continue
        if isinstance(ty, str) and ty.startswith("*") and isinstance(value, torch.Tensor):
            source = next((i for i, t in enumerate(sources) if t is value), None)
            if source is None:
                return None
            slots.append((len(items), source))
            items.append(bytes(8))
        elif ty in _SCALARS and isinstance(value, (int, float)):
            try:
                items.append(struct.pack(_SCALARS[ty], value))
            except struct.error:
                return None
        else:
            return None
    items += [bytes(8), bytes(8)]  # the global and the profile scratch pointers: none
    packed = bytearray()
    offsets: list[int] = []
    for item in items:
        packed += bytes(-len(packed) % len(item))  # natural alignment
        offsets.append(len(packed))
        packed += item
    sizes = [len(item) for item in items]
    device = -1 if bound.device_type != "cuda" else (bound.index or 0)
    try:
        return mod.TritonLaunch(int(compiled.function), bound.grid, 32 * int(meta.num_warps), int(meta.shared),
                                bytes(packed), offsets, sizes, slots, device)
    except (RuntimeError, TypeError, ValueError):
        return None
