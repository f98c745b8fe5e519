"""The functional API: :func:`rms_norm`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch
from torch import Tensor

from . import args as _args
from .ops import run
from .spec import Cast, Spec, out_dtype_for, round_to


@overload
def rms_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float | None = 1e-6,
             eps_mode: str = "inside", p: float = 1.0, partial_rounding: str = "ceil", offset: float = 0.0,
             residual: None = None, cast: str | Cast = "fp32", out_dtype: torch.dtype | None = None,
             backend: str | None = None, normalized_shape: int | Sequence[int] | None = None) -> Tensor: ...


@overload
def rms_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float | None = 1e-6,
             eps_mode: str = "inside", p: float = 1.0, partial_rounding: str = "ceil", offset: float = 0.0,
             residual: Tensor, cast: str | Cast = "fp32", out_dtype: torch.dtype | None = None,
             backend: str | None = None, normalized_shape: int | Sequence[int] | None = None
             ) -> tuple[Tensor, Tensor]: ...


def rms_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float | None = 1e-6,
    eps_mode: str = "inside",
    p: float = 1.0,
    partial_rounding: str = "ceil",
    offset: float = 0.0,
    residual: Tensor | None = None,
    cast: str | Cast = "fp32",
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
    normalized_shape: int | Sequence[int] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm / partial RMSNorm of ``x`` over its trailing ``normalized_shape`` (N elements).

    With h = x + residual (or h = x) and r the RMS of the first k elements of each (flattened) row,
    k = N for p = 1, else ceil(p*N) ("ceil", the paper) or floor(p*N) ("floor", the authors' code),

        eps_mode="inside":  r = sqrt(mean(h[:k]^2) + eps)      eps_mode="outside":  r = sqrt(mean(h[:k]^2)) + eps
        y = h / r * (weight + offset) + bias

    All N elements are divided by r; the gradient of r flows only into the first k. Statistics
    accumulate in fp32 (fp64 for fp64). ``cast="fp32"`` computes everything in fp32 with one final cast
    (torch.nn.RMSNorm); ``cast="llama"`` rounds h/r to h's dtype before the gain (Hugging Face Llama);
    ``cast="t5"`` follows the gain's dtype (rounds to a half-precision gain's dtype, outputs in it).

    The normalized shape is ``normalized_shape``, else weight's (or bias's) shape, else ``x.shape[-1:]``.
    The default eps=1e-6 differs from :class:`rmsnorm.RMSNorm`'s eps=None (torch.nn.RMSNorm's default);
    eps=None takes torch's default here too (machine epsilon of the fp32/fp64 compute dtype).
    Returns y, or (y, h) when ``residual`` is given; h has residual's dtype. ``backend=None`` picks the
    fastest available backend (or $RMSNORM_BACKEND); a named backend that cannot run the input raises.
    """
    spec = resolve(x, weight, bias, residual, normalized_shape, eps, eps_mode, p, partial_rounding, offset, cast,
                   out_dtype)
    y, h = run(x, weight, bias, residual, spec, backend)
    if residual is not None:
        assert h is not None
        return y, h
    return y


def resolve(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
            normalized_shape: int | Sequence[int] | None, eps: float | None, eps_mode: str, p: float,
            partial_rounding: str, offset: float, cast: str | Cast, out_dtype: torch.dtype | None) -> Spec:
    """Check every argument of ``rms_norm``; return the call's :class:`~rmsnorm.spec.Spec`."""
    _args.check_options(eps, eps_mode, p, partial_rounding, offset, cast)
    ns = _args.normalized_tuple(normalized_shape) if normalized_shape is not None else None
    nd, n = _args.check_tensors(x, weight, bias, residual, ns, out_dtype, offset)
    h_dtype = residual.dtype if residual is not None else x.dtype
    w_dtype = None if weight is None else weight.dtype
    if eps is None:
        eps = _args.default_eps(h_dtype)
    if cast == Cast.FP32:  # torch's numerics, the common case: no rounding, h's dtype out
        rounding, out = None, out_dtype or h_dtype
    else:
        rounding, out = round_to(cast, h_dtype, w_dtype), out_dtype or out_dtype_for(cast, h_dtype, w_dtype)
    return Spec(nd, _args.partial_size(n, p, partial_rounding), float(eps), eps_mode == "outside", float(offset),
                rounding, out, residual is not None)
