"""Adapters from row kernels on (M, N) views to the backend interface on (*batch, *normalized) tensors.

Backend interface (N-D, what :mod:`rmsnorm.ops` calls):

    forward(x, weight, bias, residual, spec) -> (y, h | None, rstd)
    backward(dy, dh, h, weight, bias, rstd, spec, need_dw, need_db) -> (dh, dw | None, db | None)

y and h have x's shape, rstd the batch shape; dw/db come in the parameters' dtype and shape.
Row kernels (:mod:`rmsnorm.reference`, the Triton launchers) see (M, N) views with contiguous rows, write
y and h into (M, N) views of outputs allocated here in the caller's shape (so that no output is a view of
a tensor made inside autograd: in-place ops on y stay legal), and return dw/db in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..spec import Spec


def as_rows(t: Tensor, n: int) -> Tensor:
    """(…, N…) -> an (M, N) view (a copy only when the layout needs it) with contiguous rows; a negative
    view (torch._neg_view) is resolved, since kernels read memory, not the view's sign bit."""
    if t.is_neg():
        t = t.resolve_neg()
    if t.dim() == 2 and (n <= 1 or t.stride(1) == 1):
        return t  # already rows (the common case: no view to make)
    t2 = t.reshape(-1, n)
    if n > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _flat(t: Tensor | None, n: int) -> Tensor | None:
    if t is None:
        return None
    t = t.resolve_neg() if t.is_neg() else t
    return t if t.dim() == 1 else t.reshape(n)


def nd_forward(row_forward: Callable) -> Callable:
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
                spec: Spec) -> tuple[Tensor, Tensor | None, Tensor]:
        nd = spec.normalized_ndim
        rows2d = nd == 1 and x.dim() == 2  # (M, N) already: no views
        n = x.shape[-1] if nd == 1 else math.prod(x.shape[x.dim() - nd:])
        res = as_rows(residual, n) if residual is not None else None
        y = torch.empty(x.shape, dtype=spec.out_dtype, device=x.device)
        h = torch.empty(x.shape, dtype=residual.dtype, device=x.device) if residual is not None else None
        out = (y, h) if rows2d else (y.view(-1, n), None if h is None else h.view(-1, n))
        _, _, rstd = row_forward(as_rows(x, n), _flat(weight, n), _flat(bias, n), res, spec, out)
        return y, h, (rstd if rows2d else rstd.view(x.shape[: x.dim() - nd]))

    return forward


def nd_backward(row_backward: Callable) -> Callable:
    def backward(dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor | None, bias: Tensor | None,
                 rstd: Tensor, spec: Spec, need_dw: bool, need_db: bool
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        nd = spec.normalized_ndim
        rows2d = nd == 1 and h.dim() == 2
        n = h.shape[-1] if nd == 1 else math.prod(h.shape[h.dim() - nd:])
        dh2 = as_rows(dh, n) if dh is not None else None
        dx, dw, db = row_backward(as_rows(dy, n), dh2, as_rows(h, n), _flat(weight, n),
                                  rstd if rows2d else rstd.reshape(-1), spec, need_dw, need_db)
        if need_dw:
            assert weight is not None and dw is not None
            dw = dw.to(weight.dtype)  # (a no-op when the row kernel wrote the weight's dtype)
            dw = dw if weight.dim() == 1 else dw.view(weight.shape)
        if need_db:
            assert bias is not None and db is not None
            db = db.to(bias.dtype)
            db = db if bias.dim() == 1 else db.view(bias.shape)
        return (dx if rows2d else dx.view(h.shape)), dw, db

    return backward
