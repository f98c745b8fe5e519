"""Eager entries by device: the short call path of a module (or of one set of ``rms_norm`` options).

An entry is ``(call, config, device_type)``: ``call(config, x, weight, bias, residual)`` returns y, (y, h)
with a residual, or None for anything it does not serve; the caller then takes the general route
(:func:`rmsnorm.ops.run`), which raises every error. CPU tensors get the cpu backend's entry (one C++ call,
``backends/cpu/entry.py``), GPU tensors the triton backend's (``backends/triton/entry.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..spec import Cast
from . import registry
from .cpu import entry as cpu_entry
from .triton import entry as triton_entry

Entry = tuple[Callable[..., Any], Any, str]


def make(device_type: str, normalized_shape: Sequence[int] | None, eps: float | None, eps_mode: str, p: float,
         partial_rounding: str, offset: float, cast: str | Cast, out_dtype: torch.dtype | None,
         backend: str | None) -> Entry | None:
    """The entry for tensors on ``device_type`` with these (already checked) options, or None."""
    options = (normalized_shape, eps, eps_mode, p, partial_rounding, offset, cast, out_dtype, backend)
    made: tuple | None = None
    if device_type == "cpu" and backend != "triton":
        made = cpu_entry.make(*options)
    elif device_type in registry.get("triton").devices:  # CUDA (CPU tensors only under Triton's interpreter)
        made = triton_entry.make(*options)
    return None if made is None else (made[0], made[1], device_type)
