"""The ``triton`` backend: fused Triton kernels for CUDA tensors (see kernels.py, heuristics.py).

With ``TRITON_INTERPRET=1`` set before import, the same kernels also run on CPU tensors in Triton's
interpreter (slow: for tests); automatic selection never picks that path.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..registry import Backend, register
from ..rows import nd_backward, nd_forward


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_available() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'rmsnorm[triton]')"
    if _interpret():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors in Triton's interpreter)"
    major, _ = torch.cuda.get_device_capability()
    if major < 7:
        return f"Triton needs compute capability 7.0 or newer, this GPU has {major}.x"
    return None


def _row_forward(x, weight, bias, residual, spec, out=None):
    from .launch import forward

    return forward(x, weight, bias, residual, spec, out)


def _row_backward(dy, dh, h, weight, rstd, spec, need_dw, need_db):
    from .launch import backward

    return backward(dy, dh, h, weight, rstd, spec, need_dw, need_db)


BACKEND = register(Backend(
    name="triton",
    priority=20,
    devices=frozenset({"cuda", "cpu"} if _interpret() else {"cuda"}),
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
    forward=nd_forward(_row_forward),
    backward=nd_backward(_row_backward),
    check_available=_check_available,
    description="fused Triton forward/backward (row tiles in registers, persistent backward, looped huge N)",
    auto_devices=frozenset({"cuda"}),
))
