"""``rmsnorm.RMSNorm``: a drop-in for ``torch.nn.RMSNorm`` with partial RMS, bias, offset and residual fusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.compiler import is_compiling

from . import args as _args
from .backends import entries, registry
from .functional import resolve, rms_norm
from .ops import run
from .spec import Cast


class RMSNorm(nn.Module):
    """y = x / RMS_k(x) * (weight + offset) + bias over the trailing ``normalized_shape``.

    Same positional signature, parameters and state_dict keys as ``torch.nn.RMSNorm`` (``weight``, and
    ``bias`` when ``bias=True``); ``eps=None`` gives torch's default. ``p < 1`` takes the RMS over the
    first ceil(p*N) elements (pRMSNorm). The gain is initialised so that ``weight + offset == 1``.
    ``forward(x, residual=None)`` returns y, or (y, x + residual) when a residual is given. ``out_dtype``
    fixes the output dtype (default: the input's, or with cast="llama" its promotion with the gain's).
    ``backend`` names the backend every call uses (None: the automatic choice, or $RMSNORM_BACKEND).

    Defaults differ from :func:`rmsnorm.rms_norm` on purpose: the module's ``eps=None`` is torch.nn.RMSNorm's
    (machine epsilon of the fp32/fp64 compute dtype), the function's default is ``eps=1e-6``.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | torch.Size,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = False,
        p: float = 1.0,
        eps_mode: str = "inside",
        partial_rounding: str = "ceil",
        offset: float = 0.0,
        cast: str | Cast = "fp32",
        out_dtype: torch.dtype | None = None,
        backend: str | None = None,
        group_size: int | None = None,
        gate_mode: str = "after",
        gate_act: str = "silu",
    ) -> None:
        super().__init__()
        _args.check_options(eps, eps_mode, p, partial_rounding, offset, cast)
        _args.check_gate_options(gate_mode, gate_act, group_size)
        if group_size is not None and cast == Cast.RSTD:
            raise ValueError("cast='rstd' is not supported with group_size")
        self.group_size = group_size
        self.gate_mode = gate_mode
        self.gate_act = gate_act
        if backend is not None:
            registry.get(backend)  # an unknown name fails here, not at the first call
        self.backend = backend
        if offset != 0.0 and not elementwise_affine:
            raise ValueError("offset applies to the gain: it needs elementwise_affine=True")
        self.normalized_shape = _args.normalized_tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.p = float(p)
        self.eps_mode = eps_mode
        self.partial_rounding = partial_rounding
        self.offset = float(offset)
        self.cast = Cast(cast)
        if out_dtype is not None and out_dtype not in _args.FLOAT_DTYPES:
            raise TypeError(f"out_dtype must be a floating dtype, got {out_dtype}")
        self.out_dtype = out_dtype
        factory: dict = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory)) if bias else None
        else:
            if bias:
                raise ValueError("bias=True needs elementwise_affine=True")
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def k(self) -> int:
        """Number of leading elements the RMS is taken over."""
        n = 1
        for s in self.normalized_shape:
            n *= s
        return _args.partial_size(n, self.p, self.partial_rounding)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - self.offset)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @overload
    def forward(self, x: Tensor, residual: None = None, gate: Tensor | None = None) -> Tensor: ...

    @overload
    def forward(self, x: Tensor, residual: Tensor, gate: None = None) -> tuple[Tensor, Tensor]: ...

    def forward(self, x: Tensor, residual: Tensor | None = None,
                gate: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """y, or (y, x + residual) with a residual; ``gate``: gated RMSNorm (see :func:`rmsnorm.rms_norm`)."""
        if gate is not None or self.group_size is not None:
            return rms_norm(x, self.weight, self.bias, eps=self.eps, eps_mode=self.eps_mode, p=self.p,
                            partial_rounding=self.partial_rounding, offset=self.offset, residual=residual,
                            cast=self.cast, out_dtype=self.out_dtype, normalized_shape=self.normalized_shape,
                            backend=self.backend, gate=gate, gate_mode=self.gate_mode, gate_act=self.gate_act,
                            group_size=self.group_size)
        if not is_compiling() and type(self) is RMSNorm:
            # The eager entry of x's device (backends/entries.py: one C++ call on CPU, a bound Triton launch
            # on the GPU), or None for the paths below. Parameters come straight from _parameters (a
            # subclass made by parametrize has its own lookup).
            fast = self.__dict__.get("_entry")
            if fast is not None:
                if fast[0] is not None:
                    params = self._parameters
                    y = fast[0](fast[1], x, params.get("weight"), params.get("bias"), residual)
                    if y is not None:
                        return y  # (y, x + residual) with a residual
                if type(x) is Tensor and x.device.type != fast[2]:
                    del self.__dict__["_entry"]  # the module moved to another device: a new entry next call
            elif type(x) is Tensor:
                self.__dict__["_entry"] = entries.make(
                    x.device.type, self.normalized_shape, self.eps, self.eps_mode, self.p, self.partial_rounding,
                    self.offset, self.cast, self.out_dtype, self.backend) or (None, None, x.device.type)
        if residual is None and type(x) is Tensor and not is_compiling():
            # Other devices (and what the entry declines): the checked arguments are cached per dtypes
            # and devices; changing an option (or a parameter) clears the cache (__setattr__), and only x's
            # trailing shape is checked again. Parameters come straight from _parameters for this class
            # (a subclass, e.g. one made by parametrize, goes through its own attribute lookup).
            if type(self) is RMSNorm:
                params = self._parameters
                w, b = params.get("weight"), params.get("bias")
            else:
                w, b = self.weight, self.bias
            key = (x.dtype, x.device, None if w is None else (w.dtype, w.device),
                   None if b is None else (b.dtype, b.device))
            cache = self.__dict__.get("_resolved")
            if cache is None:
                cache = self.__dict__["_resolved"] = {}
            hit = cache.get(key)
            if hit is None:
                if len(cache) > 32:
                    cache.clear()
                hit = cache[key] = (resolve(x, w, b, None, self.normalized_shape, self.eps, self.eps_mode, self.p,
                                            self.partial_rounding, self.offset, self.cast, self.out_dtype),
                                    None if w is None else w.shape, None if b is None else b.shape)
            spec, w_shape, b_shape = hit
            nd = spec.normalized_ndim
            if (x.dim() >= nd and x.shape[x.dim() - nd:] == self.normalized_shape
                    and (w is None or w.shape == w_shape) and (b is None or b.shape == b_shape)):
                return run(x, w, b, None, spec, self.backend)[0]
        return rms_norm(x, self.weight, self.bias, eps=self.eps, eps_mode=self.eps_mode, p=self.p,
                        partial_rounding=self.partial_rounding, offset=self.offset, residual=residual,
                        cast=self.cast, out_dtype=self.out_dtype, normalized_shape=self.normalized_shape,
                        backend=self.backend)

    _OPTIONS = frozenset({"eps", "p", "eps_mode", "partial_rounding", "offset", "cast", "out_dtype",
                          "normalized_shape", "weight", "bias", "backend", "group_size"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in RMSNorm._OPTIONS:
            self.__dict__.pop("_resolved", None)  # the fast paths' checked arguments depend on it
            self.__dict__.pop("_entry", None)
        super().__setattr__(name, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # modules saved before the gate options existed (torch.save of a whole model) load with the defaults
        state.setdefault("group_size", None)
        state.setdefault("gate_mode", "after")
        state.setdefault("gate_act", "silu")
        super().__setstate__(state)

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy and pickle (torch.save of a whole model) leave the per-process caches behind
        state = self.__dict__.copy()
        state.pop("_entry", None)
        state.pop("_resolved", None)
        return state

    def extra_repr(self) -> str:
        parts = [f"{self.normalized_shape}", f"eps={self.eps}", f"elementwise_affine={self.elementwise_affine}"]
        if self.bias is not None:
            parts.append("bias=True")
        if self.p < 1.0:
            parts.append(f"p={self.p} (k={self.k}, {self.partial_rounding})")
        if self.eps_mode != "inside":
            parts.append(f"eps_mode={self.eps_mode!r}")
        if self.offset != 0.0:
            parts.append(f"offset={self.offset}")
        if self.cast != Cast.FP32:
            parts.append(f"cast={Cast(self.cast).value!r}")
        if self.out_dtype is not None:
            parts.append(f"out_dtype={self.out_dtype}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        if self.group_size is not None:
            parts.append(f"group_size={self.group_size}")
        if self.gate_mode != "after" or self.gate_act != "silu" or type(self) is not RMSNorm:
            parts.append(f"gate_mode={self.gate_mode!r}, gate_act={self.gate_act!r}")
        return ", ".join(parts)

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm, *, keep_bias: bool = False, p: float = 1.0,
                       eps_mode: str = "inside", partial_rounding: str = "ceil", cast: str | Cast = "fp32",
                       offset: float = 0.0) -> RMSNorm:
        """An RMSNorm with ``ln``'s shape, eps, gain (and bias with ``keep_bias``), on its device and dtype.
        ``offset=1.0`` for LayerNorms whose gain is 1 + weight (NemotronLayerNorm1P and the like).

        Not equivalent to ``ln`` unless its inputs have zero mean: use for training or fine-tuning, or
        :func:`rmsnorm.convert` with ``exact=True`` for an exact transformation.
        """
        if not isinstance(ln, nn.LayerNorm):
            raise TypeError(f"ln must be a torch.nn.LayerNorm, got {type(ln).__name__}")
        affine = ln.weight is not None
        has_bias = keep_bias and ln.bias is not None
        ref = ln.weight if affine else None
        out = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=affine, bias=has_bias, p=p,
                  eps_mode=eps_mode, partial_rounding=partial_rounding, cast=cast, offset=offset,
                  device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
        with torch.no_grad():
            if affine and out.weight is not None:
                out.weight.copy_(ln.weight)
            if has_bias and out.bias is not None:
                out.bias.copy_(ln.bias)
        return out


class GatedRMSNorm(RMSNorm):
    """Gated RMSNorm as the Mamba-2 family (``gate_mode="before"``: the norm of x * silu(z), by groups of
    ``group_size``) and the Qwen3-Next family (``"after"``: the norm times silu(z)) compute it, called as
    those modules are: ``forward(x, gate=None)``. Same options as :class:`RMSNorm` (see
    :func:`rmsnorm.rms_norm` for the gate's math); a call without a gate is a plain (grouped) RMSNorm.
    """

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(x, None, gate)
