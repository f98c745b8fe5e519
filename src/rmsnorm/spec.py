"""The spec of one RMSNorm call: every option the kernels need, resolved, in one immutable object.

:func:`rmsnorm.functional.resolve` builds a :class:`Spec` from the user's arguments (the module caches
it per dtypes and devices) and every layer passes it whole:

==========================  ================================================================
layer                       what it receives
==========================  ================================================================
router (``ops.run``)        the Spec
custom ops, DTensor rules   ``spec.encode()``: one string argument (the schema holds no objects)
backends (registry)         the Spec; each answers "supported, or why not" before it is called
C++ kernels                 the Spec, converted to one C++ struct at the binding (kernel.cpp)
decomposition               the Spec (``rmsnorm.composite``)
==========================  ================================================================

Adding an option is a field here, its resolution in ``functional.resolve``, and its use in the kernels;
no signature in between changes.

Cast modes (:class:`Cast`) say where the normalized row h/r is rounded before the gain multiply; a
Spec stores what that means for the call's dtypes, ``round_to``:

- ``fp32``: never (torch.nn.RMSNorm: everything in fp32, one cast of the result);
- ``llama``: to the dtype of h (Hugging Face Llama: ``weight * hidden.to(input_dtype)``);
- ``t5``: to the gain's dtype when the gain is fp16/bf16 (T5: ``weight * hidden.to(weight.dtype)``);
- ``rstd``: as ``llama``, and the inverse RMS 1/r is itself rounded to h's dtype before it multiplies h
  (DeepSeek-V4, GLM-5 Next: ``x * torch.rsqrt(variance + eps).to(x.dtype)``), stored as ``rstd_round``.

Rounding to fp32 or fp64 is the identity on fp32 (fp64) arithmetic, so ``round_to`` is only ever
``torch.bfloat16``, ``torch.float16`` or None.
"""

from __future__ import annotations

import functools
from enum import StrEnum
from typing import NamedTuple

import torch


class Cast(StrEnum):
    """Where the normalized row is rounded before the gain (see the module docstring). A member equals its
    string: ``cast="llama"`` and ``cast=Cast.LLAMA`` are the same option."""

    FP32 = "fp32"
    LLAMA = "llama"
    T5 = "t5"
    RSTD = "rstd"


HALF = (torch.float16, torch.bfloat16)


def round_to(cast: Cast | str, h_dtype: torch.dtype, weight_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype ``cast`` rounds the normalized row to, for h of ``h_dtype`` and a gain of ``weight_dtype``."""
    if cast in (Cast.LLAMA, Cast.RSTD):
        return h_dtype if h_dtype in HALF else None
    if cast == Cast.T5:
        return weight_dtype if weight_dtype in HALF else None
    return None


def rstd_round_to(cast: Cast | str, h_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype ``cast`` rounds 1/r to before it multiplies h ("rstd" with a half-precision h), else None."""
    return h_dtype if cast == Cast.RSTD and h_dtype in HALF else None


def out_dtype_for(cast: Cast | str, h_dtype: torch.dtype, weight_dtype: torch.dtype | None) -> torch.dtype:
    """Output dtype when none is given: h's (torch.nn.RMSNorm, also for a gain of another dtype); with
    "llama" (and "rstd") the promotion of h's and the gain's (``weight * hidden.to(input_dtype)``); with "t5"
    the gain's."""
    if weight_dtype is not None:
        if cast in (Cast.LLAMA, Cast.RSTD):
            return torch.promote_types(h_dtype, weight_dtype)
        if cast == Cast.T5:
            return weight_dtype
    return h_dtype


class Spec(NamedTuple):
    """Resolved options of one call (immutable, hashable, cheap to compare).

    With h = x (+ residual) and its rows flattened over the trailing ``normalized_ndim`` dims (N elements):
    r = sqrt(mean(h[:k]^2) + eps), or sqrt(mean(h[:k]^2)) + eps with ``eps_outside``;
    y = round(h * s) * (weight + offset) + bias in ``out_dtype``, where round goes through ``round_to`` and
    s = 1/r, itself rounded through ``rstd_round`` when that is set.
    """

    normalized_ndim: int
    k: int  # elements of each flattened row the RMS is taken over: 1 <= k <= N (0 only for N = 0)
    eps: float
    eps_outside: bool
    offset: float
    round_to: torch.dtype | None
    out_dtype: torch.dtype
    residual: bool  # h = x + residual is normalized and returned as a second output
    # Gated RMSNorm (Mamba-2, Qwen3-Next, ...), with a = act(z) in the compute dtype: "before" normalizes
    # x * a; "after" multiplies the norm's result u by a (u first rounded through gate_round, if set).
    gate: str | None = None  # None, "before" or "after"
    gate_act: str = "silu"  # "silu" or "sigmoid"
    group: int = 0  # > 0: the RMS is taken over consecutive groups of this many elements of a row
    gate_round: torch.dtype | None = None  # "after": the dtype u is rounded to before the gate (None: none)
    rstd_round: torch.dtype | None = None  # cast "rstd": the dtype 1/r is rounded to before it multiplies h

    @property
    def kernel_plain(self) -> bool:
        """No gate and no groups: what the fused kernels run (the rest is decomposed)."""
        return self.gate is None and self.group == 0

    def encode(self) -> str:
        """The spec as one string (the custom ops' argument); :func:`decode` inverts it exactly.
        Plain formatting (no cache), so that torch.compile traces it."""
        return (f"nd={self.normalized_ndim};k={self.k};eps={self.eps!r};eps_outside={int(self.eps_outside)};"
                f"offset={self.offset!r};round_to={_dtype_name(self.round_to)};out={_dtype_name(self.out_dtype)};"
                f"residual={int(self.residual)};gate={self.gate or 'none'};act={self.gate_act};group={self.group};"
                f"gate_round={_dtype_name(self.gate_round)};rstd_round={_dtype_name(self.rstd_round)}")


def plain(out_dtype: torch.dtype, n: int = 1) -> Spec:
    """torch.nn.RMSNorm's options for rows of n elements (eps 1e-6, output in ``out_dtype``)."""
    return Spec(1, n, 1e-6, False, 0.0, None, out_dtype, False)


def _dtype_name(dt: torch.dtype | None) -> str:
    return "none" if dt is None else str(dt).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype | None:
    if name == "none":
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"not a dtype: {name!r}")
    return dt


@functools.lru_cache(maxsize=1024)
def decode(text: str) -> Spec:
    """The :class:`Spec` that :meth:`Spec.encode` wrote."""
    try:
        f = dict(item.split("=", 1) for item in text.split(";"))
        out = _dtype(f["out"])
        assert out is not None
        gate = f.get("gate", "none")
        return Spec(int(f["nd"]), int(f["k"]), float(f["eps"]), f["eps_outside"] == "1", float(f["offset"]),
                    _dtype(f["round_to"]), out, f["residual"] == "1", None if gate == "none" else gate,
                    f.get("act", "silu"), int(f.get("group", "0")), _dtype(f.get("gate_round", "none")),
                    _dtype(f.get("rstd_round", "none")))
    except (KeyError, ValueError, AssertionError):
        raise ValueError(f"not an rmsnorm spec: {text!r}") from None
