"""Reference RMSNorm / pRMSNorm: plain PyTorch forward and a hand-written backward.

This is the oracle every other backend is tested against. It works on rows: ``x`` of shape (M, N),
gain ``w`` and bias ``b`` of N elements. With ``r`` the row's RMS statistic over its first k elements,

    eps inside:   r = sqrt(mean(h[:k]^2) + eps)          (torch, LLaMA, T5, the authors' TF code)
    eps outside:  r = sqrt(mean(h[:k]^2)) + eps          (the authors' PyTorch code)
    y = (h / r) * (w + offset) + b,     h = x (+ residual)

Backward, with g = w + offset, dyg = dy * g, S = sum_j dyg_j h_j (over all N) and rstd = 1/r:

    dh_i = rstd * dyg_i - [i < k] * h_i * c * S,
    c = rstd^3 / k                  (inside)
    c = rstd^2 / (k * sqrt(ms))     (outside; 0 for an all-zero prefix, the subgradient torch uses)
    dw_j = sum_rows dy_j * h_j * rstd,   db_j = sum_rows dy_j

Accumulation is in fp32 (fp64 for fp64 inputs). Where the spec's cast rounds (``spec.round_to``: h's dtype
with cast="llama", a half-precision gain's with "t5") the normalized row is rounded to that dtype before
the gain multiply (and in dw); the backward treats that rounding as identity.
"""

from __future__ import annotations

import torch

from .args import compute_dtype
from .spec import Spec


def rounded_rstd(rstd: torch.Tensor, spec: Spec) -> torch.Tensor:
    """1/r as it multiplies h: rounded through ``spec.rstd_round`` when set (cast "rstd"). The gradient
    treats that rounding as the identity, as autograd does a dtype cast."""
    return rstd if spec.rstd_round is None else rstd.to(spec.rstd_round).to(rstd.dtype)


def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            residual: torch.Tensor | None, spec: Spec, out: tuple[torch.Tensor, torch.Tensor | None] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Rows (M, N) -> (y, h or None, rstd). h = x + residual rounded to residual's dtype is what is normalized.
    ``out``: (y, h) tensors to write into (as the fused backends do)."""
    if residual is not None:
        cd = compute_dtype(residual.dtype)
        h = (x.to(cd) + residual.to(cd)).to(residual.dtype)
    else:
        h = x
    cd = compute_dtype(h.dtype)
    hf = h.to(cd)
    ms = hf[:, : spec.k].square().sum(dim=1) / spec.k
    rstd = torch.rsqrt(ms + spec.eps) if not spec.eps_outside else 1.0 / (ms.sqrt() + spec.eps)
    xhat = hf * rounded_rstd(rstd, spec)[:, None]
    if spec.round_to is not None:
        xhat = xhat.to(spec.round_to).to(cd)
    if weight is not None:
        xhat = xhat * (weight.to(cd) + spec.offset)
    if bias is not None:
        xhat = xhat + bias.to(cd)
    y = xhat.to(spec.out_dtype)
    if out is not None:
        y = out[0].copy_(y)
        if residual is not None and out[1] is not None:
            h = out[1].copy_(h)
    return y, (h if residual is not None else None), rstd


def backward(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
             rstd: torch.Tensor, spec: Spec, need_dw: bool, need_db: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Rows -> (gradient of h in h's dtype, dw in fp32 or None, db in fp32 or None); see the module docstring.
    ``dy`` is the gradient of y, ``dh`` (or None) the gradient of the h output, added to h's gradient."""
    cd = compute_dtype(h.dtype)
    hf, dyf, rstd = h.to(cd), dy.to(cd), rstd.to(cd)
    g = weight.to(cd) + spec.offset if weight is not None else None
    dyg = dyf * g if g is not None else dyf
    s = (dyg * hf).sum(dim=1)
    if spec.eps_outside:
        root = 1.0 / rstd - spec.eps
        c = torch.where(root > 0, rstd * rstd / (spec.k * root.clamp_min(torch.finfo(cd).tiny)), 0.0)
    else:
        c = rstd * rstd * rstd / spec.k
    grad = dyg * rstd[:, None]
    grad[:, : spec.k] -= hf[:, : spec.k] * (c * s)[:, None]
    if dh is not None:
        grad = grad + dh.to(cd)
    dw = db = None
    if need_dw:
        xhat = hf * rounded_rstd(rstd, spec)[:, None]
        if spec.round_to is not None:
            xhat = xhat.to(spec.round_to).to(cd)
        dw = (dyf * xhat).sum(dim=0)
    if need_db:
        db = dyf.sum(dim=0)
    return grad.to(h.dtype), dw, db
