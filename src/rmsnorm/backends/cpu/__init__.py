"""The ``cpu`` backend: fused, multi-threaded, vectorized C++ kernels (see kernel.cpp)."""

from __future__ import annotations

import torch

from ...spec import Spec
from ..registry import Backend, register
from . import build
from .heuristics import launch


def _check_available() -> str | None:
    build.load()
    return None


def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            residual: torch.Tensor | None, spec: Spec):
    return build.module().forward(x, weight, bias, residual, spec, *launch(x))


def backward(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
             bias: torch.Tensor | None, rstd: torch.Tensor, spec: Spec, need_dw: bool, need_db: bool):
    return build.module().backward(dy, dh, h, weight, bias, rstd, spec, need_dw, need_db, *launch(h))


def autograd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             residual: torch.Tensor | None, spec: Spec):
    """Forward recorded for autograd by a C++ torch::autograd::Function (no Python in the backward)."""
    out = build.module().forward_autograd(x, weight, bias, residual, spec, *launch(x))
    return out[0], (out[1] if residual is not None else None)


def gated_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  gate: torch.Tensor | None, spec: Spec) -> torch.Tensor:
    """A gated or grouped call (``spec.kernel_plain`` is False) without autograd."""
    return build.module().forward_gated(x, weight, bias, gate, spec, *launch(x))[0]


class GatedFunction(torch.autograd.Function):
    """Autograd over the fused gated kernels; a backward with create_graph=True (grad mode on inside it)
    differentiates :func:`rmsnorm.composite.gated` instead, so higher derivatives stay exact."""

    @staticmethod
    def forward(ctx, x, weight, bias, gate, spec):
        blocks, stream = launch(x)
        y, rstd = build.module().forward_gated(x, weight, bias, gate, spec, blocks, stream)
        ctx.save_for_backward(x, weight, bias, gate, rstd)
        ctx.spec, ctx.launch = spec, (blocks, stream)
        return y

    @staticmethod
    def backward(ctx, dy):
        from ...composite import gated_backward

        def kernel(dy, x, weight, bias, gate, rstd, need_dw, need_db):
            return build.module().backward_gated(dy, x, weight, bias, gate, rstd, ctx.spec, need_dw, need_db,
                                                 *ctx.launch)

        return gated_backward(ctx, dy, kernel)


def gated_autograd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   gate: torch.Tensor | None, spec: Spec) -> torch.Tensor:
    return GatedFunction.apply(x, weight, bias, gate, spec)


BACKEND = register(Backend(
    name="cpu",
    priority=10,
    devices=frozenset({"cpu"}),
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
    forward=forward,
    backward=backward,
    check_available=_check_available,
    description="fused C++ forward/backward, vectorized with ATen Vectorized<>, threads over row blocks",
    autograd=autograd,
))
