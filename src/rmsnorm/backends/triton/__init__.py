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


def _rows(x, gate, spec):
    """(x, gate or None, spec, period) as the row kernels take a gated or grouped call: contiguous rows of
    the group (or the whole row), the spec's k the row length, ``period`` groups to a row of the call."""
    n = x.shape[-1]
    g = spec.group or n
    x2 = x.reshape(-1, g).contiguous()
    z2 = gate.reshape(-1, g).contiguous() if gate is not None else None
    return x2, z2, (spec._replace(k=g) if spec.group else spec), n // g


def _gated_forward(x, weight, bias, gate, spec) -> tuple[torch.Tensor, torch.Tensor]:
    from .launch import forward

    x2, z2, rspec, period = _rows(x, gate, spec)
    y = torch.empty(x.shape, dtype=spec.out_dtype, device=x.device)
    _, _, rstd = forward(x2, weight, bias, None, rspec, out=(y.view(x2.shape), None), gate=z2, period=period)
    return y, rstd


class GatedFunction(torch.autograd.Function):
    """A gated call (``spec.gate``, whole rows) on the Triton row kernels; a backward with create_graph=True
    differentiates :func:`rmsnorm.composite.gated` on the saved inputs instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, gate, spec):
        y, rstd = _gated_forward(x, weight, bias, gate, spec)
        ctx.save_for_backward(x, weight, bias, gate, rstd)
        ctx.spec = spec
        return y

    @staticmethod
    def backward(ctx, dy):
        from ...composite import gated_backward
        from .launch import backward

        def kernel(dy, x, weight, bias, gate, rstd, need_dw, need_db):
            x2, z2, rspec, period = _rows(x, gate, ctx.spec)
            dz = torch.empty(z2.shape, dtype=gate.dtype, device=x.device) if z2 is not None else None
            dx, dw, db = backward(dy.reshape(x2.shape).contiguous(), None, x2, weight, rstd, rspec, need_dw,
                                  need_db, gate=z2, bias=bias, dz=dz, period=period)
            return (dx.view(x.shape), dz.view(gate.shape) if dz is not None else None,
                    dw.to(weight.dtype) if need_dw and dw is not None and weight is not None else None,
                    db.to(bias.dtype) if need_db and db is not None and bias is not None else None)

        return gated_backward(ctx, dy, kernel)


def gated_call(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               gate: torch.Tensor | None, spec) -> torch.Tensor | None:
    """A gated or grouped call on the row kernels (a group is a row of its own, with its part of the
    gain), or None when its rows need another kernel (decompose it then)."""
    from .launch import gated_supported

    g = spec.group or x.shape[-1]
    if spec.normalized_ndim != 1 or not gated_supported(x.numel() // g, g, x.element_size(), x.device):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, gate)):
        return GatedFunction.apply(x, weight, bias, gate, spec)
    return _gated_forward(x, weight, bias, gate, spec)[0]


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
