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
"""

from __future__ import annotations

import os
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


class Bound:
    """One launch of one kernel specialization (grid, constexprs and launch options fixed):
    ``bound(*args)`` launches it. The first call goes through Triton's own path (which compiles and caches the
    kernel) and keeps the compiled kernel; later calls run it directly. The caller guarantees that every later
    call's arguments specialize as the first call's did (see :class:`Prebound` for what Triton looks at)."""

    __slots__ = ("bindable", "compiled", "consts", "grid", "index", "kernel", "stream", "tail")

    def __init__(self, kernel: Any, grid: Sequence[int], consts: dict, device: torch.device) -> None:
        self.kernel, self.consts = kernel, consts
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.bindable = device.type in DEVICES
        self.index = device.index
        self.compiled: Any = None
        self.tail: tuple = ()
        self.stream: Any = None

    def __call__(self, *args: Any) -> None:
        compiled = self.compiled
        if compiled is not None and _enabled[0] and not _hooked((_triton or _import_triton())[0].runtime):
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
            if all(hasattr(compiled, f) for f in ("run", "function", "packed_metadata")) and all(
                    n in self.consts for n in names):
                if self.index is None:
                    self.index = active.get_current_device()
                self.stream = active.get_current_stream  # (the driver's; Triton keeps one per process)
                self.tail = tuple(self.consts[n] for n in names)
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
