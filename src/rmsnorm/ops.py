"""The autograd / custom-op layer.

Two torch.library custom ops, ``rmsnorm::forward`` and ``rmsnorm::backward``, with fake (meta)
implementations and registered autograd, so that torch.compile(fullgraph=True) and torch.export see one
opaque node per norm. In eager mode the same kernels are called through a ``torch.autograd.Function``
(or directly when no gradient is needed): the custom-op dispatcher costs about 15 µs a call, more than a
small norm takes.

Both ops work on tensors of the caller's shape ``(*batch, *normalized_shape)`` and reshape to rows
internally, so that tensor subclasses (DTensor) see the original shape and layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .args import Params, compute_dtype
from .backends import registry


def forward_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
                 nd: int, prm: Params, out_dtype: torch.dtype, backend: str
                 ) -> tuple[Tensor, Tensor | None, Tensor]:
    """One backend's forward on x of shape (*batch, *normalized): (y, h | None, rstd)."""
    return registry.get(backend).forward(x, weight, bias, residual, nd, prm, out_dtype)


def backward_impl(dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor | None, bias: Tensor | None,
                  rstd: Tensor, nd: int, prm: Params, need_dw: bool, need_db: bool, backend: str
                  ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients (d h in h's dtype, dw in weight's dtype | None, db in bias's dtype | None)."""
    return registry.get(backend).backward(dy, dh, h, weight, bias, rstd, nd, prm, need_dw, need_db)


# -------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("rmsnorm::forward", mutates_args=())
def forward_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
               normalized_ndim: int, k: int, eps: float, eps_outside: bool, offset: float, llama: bool,
               out_dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, rstd); h is an empty tensor without a residual."""
    prm = Params(k, eps, eps_outside, offset, llama)
    y, h, rstd = forward_impl(x, weight, bias, residual, normalized_ndim, prm, out_dtype, backend)
    return y, (h if h is not None else x.new_empty(0)), rstd


@forward_op.register_fake
def _forward_fake(x, weight, bias, residual, normalized_ndim, k, eps, eps_outside, offset, llama, out_dtype,
                  backend):
    h_dtype = residual.dtype if residual is not None else x.dtype
    y = x.new_empty(x.shape, dtype=out_dtype)
    h = x.new_empty(x.shape, dtype=h_dtype) if residual is not None else x.new_empty(0)
    rstd = x.new_empty(x.shape[: x.dim() - normalized_ndim], dtype=compute_dtype(h_dtype))
    return y, h, rstd


@torch.library.custom_op("rmsnorm::backward", mutates_args=())
def backward_op(dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor | None, bias: Tensor | None,
                rstd: Tensor, normalized_ndim: int, k: int, eps: float, eps_outside: bool, offset: float,
                llama: bool, need_dw: bool, need_db: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dh_total, dw, db); dw/db are empty tensors when not needed."""
    prm = Params(k, eps, eps_outside, offset, llama)
    dx, dw, db = backward_impl(dy, dh, h, weight, bias, rstd, normalized_ndim, prm, need_dw, need_db, backend)
    return dx, (dw if dw is not None else h.new_empty(0)), (db if db is not None else h.new_empty(0))


@backward_op.register_fake
def _backward_fake(dy, dh, h, weight, bias, rstd, normalized_ndim, k, eps, eps_outside, offset, llama,
                   need_dw, need_db, backend):
    dw = weight.new_empty(weight.shape) if need_dw else h.new_empty(0)
    db = bias.new_empty(bias.shape) if need_db else h.new_empty(0)
    return h.new_empty(h.shape), dw, db


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, nd, k, eps, eps_outside, offset, llama, _out_dtype, backend = inputs
    _, h, rstd = output
    _save(ctx, x, weight, bias, residual, h, rstd, nd, Params(k, eps, eps_outside, offset, llama), backend)


def _save(ctx, x, weight, bias, residual, h, rstd, nd, prm, backend) -> None:
    ctx.save_for_backward(h if residual is not None else x, weight, bias, rstd)
    ctx.x_dtype = x.dtype
    ctx.has_residual = residual is not None
    ctx.nd, ctx.prm, ctx.backend = nd, prm, backend


def _input_grads(ctx, dy: Tensor | None, dh: Tensor | None, bwd) -> tuple:
    """Gradients for (x, weight, bias, residual) from the saved context and a backward callable."""
    h, weight, bias, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dh = dh if ctx.has_residual else None
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    dgrad, dw, db = bwd(dy, dh, h, weight, bias, rstd, ctx.nd, ctx.prm, need_dw, need_db, ctx.backend)
    dx = dgrad if dgrad.dtype == ctx.x_dtype else dgrad.to(ctx.x_dtype)
    return dx, (dw if need_dw else None), (db if need_db else None), (dgrad if ctx.has_residual else None)


def _backward_via_op(dy, dh, h, weight, bias, rstd, nd, prm, need_dw, need_db, backend):
    return backward_op(dy, dh, h, weight, bias, rstd, nd, prm.k, prm.eps, prm.eps_outside, prm.offset,
                       prm.llama, need_dw, need_db, backend)


def _autograd_backward(ctx, dy, dh, _drstd):
    dx, dw, db, dres = _input_grads(ctx, dy, dh, _backward_via_op)
    return dx, dw, db, dres, None, None, None, None, None, None, None, None


forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------- eager autograd


class RMSNormFunction(torch.autograd.Function):
    """Eager-mode autograd over the backend kernels (same math and saved state as the custom op)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, nd, prm, out_dtype, backend):
        y, h, rstd = forward_impl(x, weight, bias, residual, nd, prm, out_dtype, backend)
        _save(ctx, x, weight, bias, residual, h, rstd, nd, prm, backend)
        ctx.set_materialize_grads(False)
        if h is None:
            return y
        return y, h

    @staticmethod
    def backward(ctx, dy, dh=None):
        dx, dw, db, dres = _input_grads(ctx, dy, dh, backward_impl)
        return dx, dw, db, dres, None, None, None, None


def run(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, nd: int,
        prm: Params, out_dtype: torch.dtype, backend: registry.Backend) -> tuple[Tensor, Tensor | None]:
    """Route one call: custom op when tracing or for tensor subclasses, else the eager fast path."""
    if type(x) is not Tensor or torch.compiler.is_compiling():
        if type(x).__name__ == "DTensor":
            from .distributed import register_dtensor_rules

            register_dtensor_rules()
        y, h, _ = forward_op(x, weight, bias, residual, nd, prm.k, prm.eps, prm.eps_outside, prm.offset,
                             prm.llama, out_dtype, backend.name)
        return y, (h if residual is not None else None)
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    ):
        if backend.autograd is not None:
            return backend.autograd(x, weight, bias, residual, nd, prm, out_dtype)
        out = RMSNormFunction.apply(x, weight, bias, residual, nd, prm, out_dtype, backend.name)
        return out if residual is not None else (out, None)
    y, h, _ = backend.forward(x, weight, bias, residual, nd, prm, out_dtype)
    return y, h
