"""The cpu backend's eager entry: one C++ call per norm for the common case (kernel.cpp, "eager entry").

A :class:`Entry` holds the options of a module (or of one set of ``rms_norm`` keyword arguments) as a
C++ ``Config``; calling it checks the tensors, resolves eps, the cast's rounding and the output dtype,
chooses grad or no-grad and the launch, and runs the kernel, all in C++. It answers None for anything it
does not serve (another device or dtype, a tensor subclass, tracing, torch.func transforms, dispatch
modes, a residual, a wrong shape, a backend other than cpu) and the caller then takes the Python path
(:func:`rmsnorm.ops.run`), which raises the errors and serves the other routes. Outputs and gradients are
those of the Python path's cpu backend, bit for bit.

The entry runs only while the backend choice for CPU tensors is ``cpu`` (named, or the automatic choice
with $RMSNORM_BACKEND unset or "cpu"): the registry tells the library when that changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...spec import Cast
from .. import registry
from . import build, heuristics

_CASTS = {Cast.FP32: 0, Cast.LLAMA: 1, Cast.T5: 2, Cast.RSTD: 3}
_listening: list[bool] = []


def _refresh() -> None:
    mod = build.loaded()
    if mod is not None:
        mod.set_auto_is_cpu(registry.automatic_choice("cpu") == "cpu")


Entry = tuple[Callable[..., Any], Any]  # (the C++ call, its Config): entry[0](entry[1], x, weight, bias)


def make(normalized_shape: Sequence[int] | None, eps: float | None, eps_mode: str, p: float,
         partial_rounding: str, offset: float, cast: str, out_dtype: torch.dtype | None,
         backend: str | None) -> Entry | None:
    """An entry for these (already checked) options, or None when the cpu backend cannot serve them."""
    if backend not in (None, "cpu") or (backend is None and registry.default() not in (None, "cpu")):
        return None  # (no build of the CPU kernels for callers that never use them)
    if registry.get("cpu").unavailable_reason() is not None:
        return None
    mod = build.module()
    if not _listening:
        _listening.append(True)
        registry.on_change(_refresh)
    else:
        _refresh()  # a module reloaded by `rmsnorm build` starts with the flag off
    cfg = mod.Config(list(normalized_shape or ()), float(p), partial_rounding == "floor",
                     None if eps is None else float(eps), eps_mode == "outside", float(offset),
                     _CASTS[Cast(cast)], out_dtype, backend == "cpu", heuristics.LAUNCH.parallel_min_elements,
                     heuristics.LAUNCH.stream_min_bytes)
    return mod.call, cfg
