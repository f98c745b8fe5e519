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

Accumulation is in fp32 (fp64 for fp64 inputs). With ``cast="llama"`` the normalized row is rounded to
the input dtype before the gain multiply (and in dw); the backward treats that rounding as identity.
"""

from __future__ import annotations

import torch

from .args import Params, compute_dtype


def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            residual: torch.Tensor | None, prm: Params, out_dtype: torch.dtype,
            out: tuple[torch.Tensor, torch.Tensor | None] | None = None
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
    ms = hf[:, : prm.k].square().sum(dim=1) / prm.k
    rstd = torch.rsqrt(ms + prm.eps) if not prm.eps_outside else 1.0 / (ms.sqrt() + prm.eps)
    xhat = hf * rstd[:, None]
    if prm.llama:
        xhat = xhat.to(h.dtype).to(cd)
    if weight is not None:
        xhat = xhat * (weight.to(cd) + prm.offset)
    if bias is not None:
        xhat = xhat + bias.to(cd)
    y = xhat.to(out_dtype)
    if out is not None:
        y = out[0].copy_(y)
        if residual is not None and out[1] is not None:
            h = out[1].copy_(h)
    return y, (h if residual is not None else None), rstd


def backward(dy: torch.Tensor, dh_out: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
             rstd: torch.Tensor, prm: Params, need_dw: bool, need_db: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Rows -> (dh in h's dtype, dw in fp32 or None, db in fp32 or None); see the module docstring."""
    cd = compute_dtype(h.dtype)
    hf, dyf, rstd = h.to(cd), dy.to(cd), rstd.to(cd)
    g = weight.to(cd) + prm.offset if weight is not None else None
    dyg = dyf * g if g is not None else dyf
    s = (dyg * hf).sum(dim=1)
    if prm.eps_outside:
        root = 1.0 / rstd - prm.eps
        c = torch.where(root > 0, rstd * rstd / (prm.k * root.clamp_min(torch.finfo(cd).tiny)), 0.0)
    else:
        c = rstd * rstd * rstd / prm.k
    dh = dyg * rstd[:, None]
    dh[:, : prm.k] -= hf[:, : prm.k] * (c * s)[:, None]
    if dh_out is not None:
        dh = dh + dh_out.to(cd)
    dw = db = None
    if need_dw:
        xhat = hf * rstd[:, None]
        if prm.llama:
            xhat = xhat.to(h.dtype).to(cd)
        dw = (dyf * xhat).sum(dim=0)
    if need_db:
        db = dyf.sum(dim=0)
    return dh.to(h.dtype), dw, db
