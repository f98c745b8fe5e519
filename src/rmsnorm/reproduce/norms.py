"""The normalization variants compared by the reproduction, behind one factory.

- ``baseline``: no normalization (identity).
- ``layernorm``: torch's fused nn.LayerNorm.
- ``rmsnorm``: this library's RMSNorm (p = 1).
- ``prmsnorm``: this library's partial RMSNorm, p = 6.25% as in all the paper's experiments.
- ``torch-rmsnorm``: torch's own nn.RMSNorm, to show what fusion buys.

Timing-only variants (the paper's 2019 setting: each norm written as framework ops, no fused kernel):
``layernorm-ops``, ``rmsnorm-ops``, ``prmsnorm-ops``. Same math as their fused counterparts.

On conv maps (:class:`SpatialNorm`, each channel over its H*W positions) pRMSNorm takes its statistic from
every 16th position (p = 6.25%, strided) rather than the first 6.25% in raster order, which would be the
image's top rows (background in Fashion-MNIST); the fused kernels take a prefix, so there it runs as
framework ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import rmsnorm
from rmsnorm.args import partial_size

VARIANTS = ("baseline", "layernorm", "rmsnorm", "prmsnorm", "torch-rmsnorm")
TIMING_VARIANTS = ("layernorm-ops", "rmsnorm-ops", "prmsnorm-ops")
PARTIAL_P = 0.0625
EPS = 1e-5


def ops_norm(variant: str, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              k: int) -> torch.Tensor:
    """The unfused (framework-op) forms over the last dimension."""
    if variant == "layernorm-ops":
        xc = x - x.mean(-1, keepdim=True)
        y = xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + EPS)
    else:
        head = x if variant == "rmsnorm-ops" else x[..., :k]
        y = x * torch.rsqrt((head * head).mean(-1, keepdim=True) + EPS)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def check_variants(names: list[str]) -> list[str]:
    bad = [n for n in names if n not in VARIANTS and n not in TIMING_VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    return names


class Norm(nn.Module):
    """Normalization over the last dimension (size ``dim``) with gain and bias, for one variant.

    ``forward(x, residual=None)``: with a residual, normalizes x + residual (post-norm); this library's
    variants fuse the addition into the kernel.
    """

    def __init__(self, variant: str, dim: int, backend: str | None = None, bias: bool = True) -> None:
        super().__init__()
        self.variant, self.backend = variant, backend
        self.k = partial_size(dim, PARTIAL_P)  # for prmsnorm-ops
        self.inner: nn.Module | None
        if variant == "baseline":
            self.inner = None
        elif variant in TIMING_VARIANTS:
            self.inner = None
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        elif variant == "layernorm":
            self.inner = nn.LayerNorm(dim, eps=EPS, bias=bias)
        elif variant == "torch-rmsnorm":
            self.inner = nn.RMSNorm(dim, eps=EPS)
            self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        else:
            p = PARTIAL_P if variant == "prmsnorm" else 1.0
            self.inner = rmsnorm.RMSNorm(dim, eps=EPS, bias=bias, p=p)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.variant in TIMING_VARIANTS:
            return ops_norm(self.variant, x if residual is None else x + residual, self.weight, self.bias, self.k)
        if self.inner is None:
            return x if residual is None else x + residual
        if isinstance(self.inner, rmsnorm.RMSNorm):
            if self.backend is not None:
                out = rmsnorm.rms_norm(x, self.inner.weight, self.inner.bias, eps=self.inner.eps, p=self.inner.p,
                                       residual=residual, backend=self.backend)
            else:
                out = self.inner(x, residual=residual)
            return out[0] if isinstance(out, tuple) else out
        h = x if residual is None else x + residual
        out = self.inner(h)
        return out + self.bias if self.variant == "torch-rmsnorm" and self.bias is not None else out


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
        elif self.variant == "rmsnorm":
            y = rmsnorm.rms_norm(x, eps=EPS, normalized_shape=hw, backend=self.backend)
        elif self.variant == "prmsnorm" or self.variant == "prmsnorm-ops":
            flat = x.flatten(-2)
            sub = flat[..., :: round(1 / PARTIAL_P)]  # every 16th position: see the module docstring
            y = (flat * torch.rsqrt((sub * sub).mean(-1, keepdim=True) + EPS)).view_as(x)
        else:
            y = ops_norm(self.variant, x.flatten(-2), None, None, 0).view_as(x)
        return torch.addcmul(self.bias[:, None, None], y, self.weight[:, None, None])
