"""The functional API: :func:`rms_norm`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import torch
from torch import Tensor
from torch.compiler import is_compiling

from . import args as _args
from .backends import entries
from .ops import run
from .spec import Cast, Spec, out_dtype_for, round_to, rstd_round_to

# Eager entries by keyword options (see rms_norm); None where the entry cannot serve them.
_ENTRIES: dict[tuple, entries.Entry | None] = {}


@overload
def rms_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float | None = 1e-6,
             eps_mode: str = "inside", p: float = 1.0, partial_rounding: str = "ceil", offset: float = 0.0,
             residual: None = None, cast: str | Cast = "fp32", out_dtype: torch.dtype | None = None,
             backend: str | None = None, normalized_shape: int | Sequence[int] | None = None,
             gate: Tensor | None = None, gate_mode: str = "after", gate_act: str = "silu",
             group_size: int | None = None) -> Tensor: ...


@overload
def rms_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float | None = 1e-6,
             eps_mode: str = "inside", p: float = 1.0, partial_rounding: str = "ceil", offset: float = 0.0,
             residual: Tensor, cast: str | Cast = "fp32", out_dtype: torch.dtype | None = None,
             backend: str | None = None, normalized_shape: int | Sequence[int] | None = None,
             gate: Tensor | None = None, gate_mode: str = "after", gate_act: str = "silu",
             group_size: int | None = None) -> tuple[Tensor, Tensor]: ...


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
    gate: Tensor | None = None,
    gate_mode: str = "after",
    gate_act: str = "silu",
    group_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm / partial RMSNorm of ``x`` over its trailing ``normalized_shape`` (N elements).

    With h = x + residual (or h = x) and r the RMS of the first k elements of each (flattened) row,
    k = N for p = 1, else ceil(p*N) ("ceil", the paper) or floor(p*N) ("floor", the authors' code),

        eps_mode="inside":  r = sqrt(mean(h[:k]^2) + eps)      eps_mode="outside":  r = sqrt(mean(h[:k]^2)) + eps
        y = h / r * (weight + offset) + bias

    All N elements are divided by r; the gradient of r flows only into the first k. Statistics
    accumulate in fp32 (fp64 for fp64). ``cast="fp32"`` computes everything in fp32 with one final cast
    (torch.nn.RMSNorm); ``cast="llama"`` rounds h/r to h's dtype before the gain (Hugging Face Llama);
    ``cast="t5"`` follows the gain's dtype (rounds to a half-precision gain's dtype, outputs in it);
    ``cast="rstd"`` is "llama" with 1/r itself rounded to h's dtype first (``x * rsqrt(ms + eps).to(x.dtype)``).

    The normalized shape is ``normalized_shape``, else weight's (or bias's) shape, else ``x.shape[-1:]``.
    The default eps=1e-6 differs from :class:`rmsnorm.RMSNorm`'s eps=None (torch.nn.RMSNorm's default);
    eps=None takes torch's default here too (machine epsilon of the fp32/fp64 compute dtype).
    Gated RMSNorm (Mamba-2 / Qwen3-Next style), with ``gate`` z of x's shape and a = silu(z) (or
    sigmoid, ``gate_act``) in fp32: ``gate_mode="before"`` normalizes x * a (the norm of the gated input);
    ``gate_mode="after"`` returns u * a, u the norm's result (rounded to the cast's output dtype first with
    cast="llama"/"t5", as ``weight * h.to(dtype)`` is), output in x's dtype unless ``out_dtype``.
    ``group_size`` G takes the RMS over consecutive groups of G elements of each row (G divides N; a
    1-D normalized shape, p = 1). Gated and grouped calls run on the cpu backend's fused kernels for CPU
    tensors, else as plain torch ops (the reference backend, other devices, torch.compile, transforms);
    they do not combine with a residual.

    Returns y, or (y, h) when ``residual`` is given; h has residual's dtype. ``backend=None`` picks the
    fastest available backend (or $RMSNORM_BACKEND); a named backend that cannot run the input raises.
    """
    key = None
    if normalized_shape is None and gate is None and group_size is None and not is_compiling():
        # The eager entry of x's device (backends/entries.py), one per set of options; the key holds the types
        # of the numbers so that eps=True never finds eps=1's entry (bools are refused on the checked path).
        key = (eps, eps.__class__, eps_mode, p, p.__class__, partial_rounding, offset, offset.__class__, cast,
               out_dtype, backend, x.device.type if x.__class__ is Tensor else None)
        fast: Any
        try:
            fast = _ENTRIES.get(key, False)
        except TypeError:  # an unhashable argument: the checks below say what is wrong with it
            fast, key = None, None
        if fast:
            y = fast[0](fast[1], x, weight, bias, residual)
            if y is not None:
                return y  # (y, h) with a residual
        elif fast is not False:
            key = None  # known, and the entry cannot serve these options
    spec = resolve(x, weight, bias, residual, normalized_shape, eps, eps_mode, p, partial_rounding, offset, cast,
                   out_dtype, gate, gate_mode, gate_act, group_size)
    if key is not None and type(x) is Tensor and len(_ENTRIES) < 256:
        _ENTRIES[key] = entries.make(x.device.type, None, eps, eps_mode, p, partial_rounding, offset, cast,
                                     out_dtype, backend)
    y, h = run(x, weight, bias, residual, spec, backend, gate)
    if residual is not None:
        assert h is not None
        return y, h
    return y


def resolve(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
            normalized_shape: int | Sequence[int] | None, eps: float | None, eps_mode: str, p: float,
            partial_rounding: str, offset: float, cast: str | Cast, out_dtype: torch.dtype | None,
            gate: Tensor | None = None, gate_mode: str = "after", gate_act: str = "silu",
            group_size: int | None = None) -> Spec:
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
    spec = Spec(nd, _args.partial_size(n, p, partial_rounding), float(eps), eps_mode == "outside", float(offset),
                rounding, out, residual is not None, rstd_round=rstd_round_to(cast, h_dtype))
    if gate is None and group_size is None:
        return spec
    if cast == Cast.RSTD:
        raise ValueError("cast='rstd' is not supported with a gate or group_size")
    group = _args.check_gate(x, gate, gate_mode, gate_act, group_size, residual, nd, n, p)
    if gate is not None and gate_mode == "after":
        # u (the norm's result) keeps the cast's rounding to its own dtype, the gated output is x's dtype
        u_dtype = out_dtype_for(cast, h_dtype, w_dtype)
        gate_round = u_dtype if cast != Cast.FP32 and u_dtype in (torch.float16, torch.bfloat16) else None
        return spec._replace(out_dtype=out_dtype or h_dtype, gate="after", gate_act=gate_act, group=group,
                             gate_round=gate_round)
    return spec._replace(gate=None if gate is None else "before", gate_act=gate_act, group=group)
