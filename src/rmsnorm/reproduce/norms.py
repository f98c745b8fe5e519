"""The normalization variants compared by the reproduction, behind one factory.

- ``baseline``: no normalization (identity).
- ``layernorm``: torch's fused nn.LayerNorm.
- ``rmsnorm``: this library's RMSNorm (p = 1).
- ``prmsnorm``: this library's partial RMSNorm, p = 6.25% as in all the paper's experiments.
- ``torch-rmsnorm``: torch's own nn.RMSNorm, to show what fusion buys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import rmsnorm

VARIANTS = ("baseline", "layernorm", "rmsnorm", "prmsnorm", "torch-rmsnorm")
PARTIAL_P = 0.0625
EPS = 1e-5


def check_variants(names: list[str]) -> list[str]:
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    return names


class Norm(nn.Module):
    """Normalization over the last dimension (size ``dim``) with gain and bias, for one variant.

    ``forward(x, residual=None)``: with a residual, normalizes x + residual (post-norm); this library's
    variants fuse the addition into the kernel.
    """

    def __init__(self, variant: str, dim: int, backend: str | None = None) -> None:
        super().__init__()
        self.variant, self.backend = variant, backend
        if variant == "baseline":
            self.inner = None
        elif variant == "layernorm":
            self.inner = nn.LayerNorm(dim, eps=EPS)
        elif variant == "torch-rmsnorm":
            self.inner = nn.RMSNorm(dim, eps=EPS)
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            p = PARTIAL_P if variant == "prmsnorm" else 1.0
            self.inner = rmsnorm.RMSNorm(dim, eps=EPS, bias=True, p=p)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.inner is None:
            return x if residual is None else x + residual
        if isinstance(self.inner, rmsnorm.RMSNorm):
            if self.backend is not None:
                out = rmsnorm.rms_norm(x, self.inner.weight, self.inner.bias, eps=self.inner.eps, p=self.inner.p,
                                       residual=residual, backend=self.backend)
            else:
                out = self.inner(x, residual=residual)
            return out if residual is None else out[0]
        h = x if residual is None else x + residual
        out = self.inner(h)
        return out + self.bias if self.variant == "torch-rmsnorm" else out


class SpatialNorm(nn.Module):
    """For conv feature maps (B, C, H, W): normalize each channel over its H*W positions (the authors'
    Lasagne CIFAR code), then a per-channel gain and bias."""

    def __init__(self, variant: str, channels: int, backend: str | None = None) -> None:
        super().__init__()
        self.variant, self.backend = variant, backend
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "baseline":
            return x
        hw = tuple(x.shape[-2:])
        if self.variant == "layernorm":
            y = F.layer_norm(x, hw, eps=EPS)
        elif self.variant == "torch-rmsnorm":
            y = F.rms_norm(x, hw, eps=EPS)
        else:
            p = PARTIAL_P if self.variant == "prmsnorm" else 1.0
            y = rmsnorm.rms_norm(x, eps=EPS, p=p, normalized_shape=hw, backend=self.backend)
        return torch.addcmul(self.bias[:, None, None], y, self.weight[:, None, None])
