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
