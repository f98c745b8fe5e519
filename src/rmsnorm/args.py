"""Argument checking and resolution shared by the functional API, the module and the custom ops.

Everything here runs on every call, so it is written to be cheap: a handful of ``isinstance`` and
set-membership checks, no tensor operations.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from .spec import Cast

EPS_MODES = ("inside", "outside")
GATE_MODES = ("before", "after")
GATE_ACTS = ("silu", "sigmoid")
CASTS = tuple(c.value for c in Cast)
ROUNDINGS = ("ceil", "floor")
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def partial_size(n: int, p: float, rounding: str = "ceil") -> int:
    """Number of elements k the partial RMS is taken over: ceil(p*n) (paper) or floor(p*n) (authors' code).

    A product that is an integer up to float round-off (0.07 * 100) counts as that integer, and
    1 <= k <= n always (k = 0 only for n = 0). Written with arithmetic and comparisons alone, so that it
    also traces when torch.compile made p symbolic.
    """
    if p >= 1.0:
        return n
    exact = p * n
    tol = 1e-9 + 1e-12 * exact
    k = math.ceil(exact - tol) if rounding == "ceil" else math.floor(exact + tol)
    return min(max(k, 1), n)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype statistics accumulate in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_eps(dtype: torch.dtype) -> float:
    """eps=None, as torch.nn.RMSNorm computes it: machine epsilon of the compute dtype.

    torch documents ``finfo(x.dtype).eps`` but its kernels use the epsilon of the accumulation type
    (fp32 for fp16/bf16 inputs); we follow what torch computes so the module is a numerical drop-in.
    """
    return torch.finfo(compute_dtype(dtype)).eps


def normalized_tuple(normalized_shape: int | Sequence[int] | torch.Size) -> tuple[int, ...]:
    """An int or a sequence of ints (torch.Size, list, tuple) -> tuple of sizes >= 0; nothing else."""
    what = f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
    if isinstance(normalized_shape, (str, bytes)):
        raise TypeError(what)
    try:
        if isinstance(normalized_shape, (Sequence, torch.Size)):
            shape = tuple(operator.index(s) for s in normalized_shape)
        else:
            shape = (operator.index(normalized_shape),)
    except TypeError:
        raise TypeError(what) from None
    if not shape or any(s < 0 for s in shape):
        raise ValueError(f"normalized_shape must be non-empty with sizes >= 0, got {shape}")
    return shape


def _check_float_tensor(name: str, t: object) -> None:
    if type(t) is not torch.Tensor and not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (fp16, bf16, fp32, fp64), got {t.dtype}")


def check_options(eps: float | None, eps_mode: str, p: float, partial_rounding: str, offset: float,
                  cast: str) -> None:
    """Validate the scalar options (shared by the functional API and the module constructor).

    Only comparisons, no math.* calls: under torch.compile(dynamic=True) the floats may be symbolic, and a
    comparison is something the compiler can guard on.
    """
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float, torch.SymFloat, torch.SymInt)):
            raise TypeError(f"eps must be a float or None, got {type(eps).__name__}")
        if not 0.0 <= eps < math.inf:  # also rejects NaN
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if eps_mode not in EPS_MODES:
        raise ValueError(f"eps_mode must be one of {EPS_MODES}, got {eps_mode!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"p must be a float in (0, 1], got {type(p).__name__}")
    if not 0.0 < p <= 1.0:  # also rejects NaN
        raise ValueError(f"p must be in (0, 1], got {p}")
    if partial_rounding not in ROUNDINGS:
        raise ValueError(f"partial_rounding must be one of {ROUNDINGS}, got {partial_rounding!r}")
    if (isinstance(offset, bool) or not isinstance(offset, (int, float, torch.SymFloat, torch.SymInt))
            or not -math.inf < offset < math.inf):
        raise TypeError(f"offset must be a finite float, got {offset!r}")
    if cast not in CASTS:  # a Cast member is also its string
        raise ValueError(f"cast must be one of {CASTS}, got {cast!r}")


def _check_param(name: str, t: torch.Tensor, normalized_shape, xdev) -> torch.Size:
    _check_float_tensor(name, t)
    shape = t.shape
    if normalized_shape is not None and shape != normalized_shape:
        raise ValueError(f"{name} must have the normalized shape {tuple(normalized_shape)}, got {tuple(shape)}")
    if t.device != xdev:
        raise ValueError(f"{name} is on {t.device} but x is on {xdev}")
    return shape


def check_tensors(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, normalized_shape: tuple[int, ...] | None,
                  out_dtype: torch.dtype | None, offset: float) -> tuple[int, int]:
    """Validate the tensor arguments; return (number of normalized dims, number of normalized elements N).

    The normalized shape is ``normalized_shape``, else weight's shape, else bias's, else x's last dim.
    """
    _check_float_tensor("x", x)
    xshape, xdev = x.shape, x.device
    source = "normalized_shape" if normalized_shape is not None else None
    if weight is not None:
        shape = _check_param("weight", weight, normalized_shape, xdev)
        if normalized_shape is None:
            normalized_shape, source = shape, "weight"
    elif offset != 0.0:
        raise ValueError("offset applies to the gain: it needs a weight (offset must be 0 without one)")
    if bias is not None:
        shape = _check_param("bias", bias, normalized_shape, xdev)
        if normalized_shape is None:
            normalized_shape, source = shape, "bias"
    if normalized_shape is None:
        if not xshape:
            raise ValueError("x must have at least one dimension")
        normalized_shape = xshape[-1:]
    nd = len(normalized_shape)
    if nd == 1:
        n = normalized_shape[0]
        ok = len(xshape) >= 1 and xshape[-1] == n
    else:
        n = 1
        for d in normalized_shape:
            n *= d
        ok = nd > 0 and len(xshape) >= nd and xshape[-nd:] == normalized_shape
    if not ok:
        raise ValueError(f"x of shape {tuple(xshape)} does not end with the normalized shape "
                         f"{tuple(normalized_shape)} (from {source})")
    if residual is not None:
        _check_float_tensor("residual", residual)
        if residual.shape != xshape:
            raise ValueError(f"residual must have the shape of x {tuple(xshape)}, got {tuple(residual.shape)}")
        if residual.device != xdev:
            raise ValueError(f"residual is on {residual.device} but x is on {xdev}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a floating dtype (fp16, bf16, fp32, fp64), got {out_dtype}")
    return nd, n


def check_gate_options(gate_mode: str, gate_act: str, group_size: int | None) -> None:
    """The gate and group options alone (shared by the functional API and the module constructor)."""
    if gate_mode not in GATE_MODES:
        raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
    if gate_act not in GATE_ACTS:
        raise ValueError(f"gate_act must be one of {GATE_ACTS}, got {gate_act!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise TypeError(f"group_size must be a positive int or None, got {group_size!r}")


def check_gate(x: torch.Tensor, gate: torch.Tensor | None, gate_mode: str, gate_act: str, group_size: int | None,
               residual: torch.Tensor | None, nd: int, n: int, p: float) -> int:
    """Validate the gate and group options of a call; return the group size (0: the whole row)."""
    check_gate_options(gate_mode, gate_act, group_size)
    if gate is not None:
        _check_float_tensor("gate", gate)
        if gate.shape != x.shape:
            raise ValueError(f"gate must have the shape of x {tuple(x.shape)}, got {tuple(gate.shape)}")
        if gate.device != x.device:
            raise ValueError(f"gate is on {gate.device} but x is on {x.device}")
        if residual is not None:
            raise ValueError("gate and residual cannot be combined (normalize x + residual first, then gate)")
    if group_size is None:
        return 0
    if nd != 1:
        raise ValueError(f"group_size needs a 1-D normalized shape, got {nd} dims")
    if n % group_size:
        raise ValueError(f"group_size {group_size} does not divide the normalized size {n}")
    if p < 1.0:
        raise ValueError("group_size cannot be combined with p < 1")
    if residual is not None:
        raise ValueError("group_size and residual cannot be combined")
    return group_size if group_size < n else 0
