"""The triton backend's eager entry: a norm call on the GPU in a few microseconds of host time.

Small norms on a GPU are launch-bound: the GPU waits while the host prepares each launch. The general route
(:func:`rmsnorm.ops.run`: argument checks, backend selection, row views, the launcher's specialization key)
costs several times a launch. An entry, like the cpu backend's (``backends/cpu/entry.py``), holds a module's
options (or one set of ``rms_norm`` keyword arguments) and serves the common call with one dictionary
lookup: the key is what the launch depends on (x's shape, strides, dtype, device and 16-byte alignment, the
same for the gain and bias, and which tensors need gradients); its value, :class:`Rows`, was built by the
checked route's own pieces (``resolve``, the registry's choice, the launch heuristics) on the first call
with that key, and holds the kernels bound to that specialization (:class:`~.prebound.Bound`). Later
calls allocate the output and launch: no checks beyond the key, no views, no Triton specialization. Once a
kernel has launched, its later launches and their allocations go through one C++ call
(``triton_forward`` / ``triton_backward`` in ``backends/cpu/kernel.cpp``, with the parameters packed by
:func:`~.prebound.cxx_launch`) where the C++ library is built and the Triton version is one whose launcher
that packing matches; elsewhere through the pre-bound Python launches.

Served: plain tensors (no subclass), rows of one trailing dimension, contiguous x (or (M, N) with unit
column stride), no residual, rows that fit the row kernels (forward, and in grad mode also the backward),
no tracing, torch.func transforms, forward-mode AD or dispatch modes. Anything else answers None and the
caller takes the general route, which raises every error. Outputs and gradients are the general route's,
bit for bit (the same kernels with the same launch parameters); backwards with ``create_graph=True`` and
unusual gradients (another dtype or layout) take the general backward.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from ...spec import Cast, Spec
from .. import registry
from . import prebound

_is_grad_enabled = torch.is_grad_enabled
_tracing = torch._C._get_tracing_state
_transforms = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack
_GENERATION = [0]  # bumped when the backend choice may change: every entry rebuilds its table
_listening: list[bool] = []
MAX_KEYS = 64  # distinct (shape, layout, dtype ...) keys remembered per entry (then it starts over)
# Rows by the handle their C++ autograd node keeps (the node's slow backward finds them here, if alive)
_ROWS: weakref.WeakValueDictionary[int, Rows] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def _changed() -> None:
    _GENERATION[0] += 1


class Plan:
    """The options of one module (or one set of ``rms_norm`` keyword arguments) and their launch table."""

    __slots__ = ("generation", "keyer", "options", "table")

    def __init__(self, options: tuple) -> None:
        self.options = options  # resolve()'s option arguments: normalized_shape ... out_dtype
        self.table: dict[Any, Rows | None] = {}
        self.generation = _GENERATION[0]
        # the key in C++ where the library is built (kernel.cpp's triton_key: the same fields and declines
        # as _python_key, as bytes), else in Python
        mod = prebound._cxx_module()
        self.keyer: Any = getattr(mod, "triton_key", None) or _python_key


def make(normalized_shape: Sequence[int] | None, eps: float | None, eps_mode: str, p: float,
         partial_rounding: str, offset: float, cast: str | Cast, out_dtype: torch.dtype | None,
         backend: str | None) -> tuple[Any, Plan] | None:
    """An entry ``(call, plan)`` for these options, or None when the triton backend cannot serve them."""
    if backend not in (None, "triton") or (backend is None and registry.default() not in (None, "triton")):
        return None
    if registry.get("triton").unavailable_reason() is not None:
        return None
    if not _listening:
        _listening.append(True)
        registry.on_change(_changed)
    return call, Plan((None if normalized_shape is None else tuple(normalized_shape), eps, eps_mode, p,
                       partial_rounding, offset, cast, out_dtype, backend))


def _tensor_key(t: Tensor | None) -> tuple | None:
    if t is None:
        return None
    return t.__class__, t.dtype, t.shape, t.stride(), t.device, t.data_ptr() & 15, t.requires_grad, t.is_neg()


def _python_key(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple | None:
    """The key of a call (its first field: whether it records a backward), or None for a call the entry does
    not serve (a subclass, tracing, a transform, a dispatch mode, a negative view)."""
    if x.__class__ is not Tensor or _tracing() is not None or _transforms() or _dispatch_modes() or x.is_neg():
        return None
    needs = _is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad))
    return (needs, needs and x.is_inference(), x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15,
            _tensor_key(weight), _tensor_key(bias))


def call(plan: Plan, x: Tensor, weight: Tensor | None, bias: Tensor | None,
         residual: Tensor | None) -> Tensor | None:
    """y, or None for anything this entry does not serve (the caller then takes the general route)."""
    if residual is not None or _forward_ad._current_level >= 0:
        return None
    key = plan.keyer(x, weight, bias)
    if key is None:
        return None
    needs = bool(key[0])
    if plan.generation != _GENERATION[0]:
        plan.table.clear()
        plan.generation = _GENERATION[0]
    try:
        rows = plan.table[key]
    except KeyError:
        if len(plan.table) >= MAX_KEYS:
            plan.table.clear()
        rows = plan.table[key] = _plan_rows(plan, x, weight, bias, needs)
    if rows is None:
        return None
    if needs:
        if rows.grad_node is not None and prebound.direct():  # the C++ autograd node, once a backward is bound
            y = rows.grad_node[0](rows.grad_node[1], x, weight, bias)
            if y is not None:
                return y
        return EntryFunction.apply(x, weight, bias, rows)
    return rows.forward(x, weight, bias, False, prebound.direct())[0]


def _plan_rows(plan: Plan, x: Tensor, weight: Tensor | None, bias: Tensor | None, grad: bool) -> Rows | None:
    """The launch plan for this key (``grad``: the call records a backward), built by the general route's
    checks and heuristics; None where the entry does not serve the call (the general route then serves
    it, and raises any error)."""
    from ...functional import resolve

    try:
        spec = resolve(x, weight, bias, None, *plan.options[:-1])
        be = registry.select(plan.options[-1], x, None, spec)
    except (TypeError, ValueError, RuntimeError):
        return None
    if be.name != "triton" or spec.normalized_ndim != 1 or not spec.kernel_plain or spec.k == 0:
        return None
    if x.is_neg() or x.numel() == 0 or not (x.is_contiguous() or (x.dim() == 2 and x.stride(1) == 1)):
        return None
    for t in (weight, bias):
        if t is not None and (t.__class__ not in (Tensor, torch.nn.Parameter) or t.is_neg() or t.dim() != 1
                              or not t.is_contiguous()):
            return None
    if grad and x.is_inference():
        return None
    return Rows.build(x, weight, bias, spec, be, grad)


class Rows:
    """Launches for one key: the forward row kernel (and, for calls that need gradients, the backward row
    kernel and the partial-sum kernel), bound to the key's specialization."""

    __slots__ = (
        "__weakref__",
        "backend",
        "bwd",
        "bwd_cfg",
        "cxx",
        "device",
        "dw_dtype",
        "fwd",
        "fwd_rstd",
        "grad_node",
        "m",
        "n",
        "node",
        "out_dtype",
        "rstd_shape",
        "scalars",
        "shape",
        "spec",
        "stride",
        "sums",
        "x_dtype",
    )

    def __init__(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: Spec, be: registry.Backend,
                 m: int, n: int, fwd_cfg: Any, bwd_cfg: Any) -> None:
        from . import kernels
        from .launch import _TL, _gate_consts, _round_ty, _rstd_ty

        self.spec, self.backend, self.device, self.m, self.n, self.x_dtype = spec, be, x.device, m, n, x.dtype
        self.shape, self.rstd_shape = x.shape, x.shape[:-1]
        self.stride: int = x.stride(0) if x.dim() == 2 else n
        self.out_dtype: torch.dtype = spec.out_dtype
        self.scalars = (self.stride, self.stride, m, n, spec.k, spec.eps, spec.offset)  # the forward's
        consts = {"BLOCK_M": fwd_cfg.block_m, "BLOCK_N": fwd_cfg.block_n, "PARTIAL": spec.k < n,
                  "num_warps": fwd_cfg.num_warps, "HAS_R": False, "HAS_W": weight is not None,
                  "HAS_B": bias is not None, "EPS_OUTSIDE": spec.eps_outside, "ROUND_TY": _round_ty(spec),
                  "RSTD_TY": _rstd_ty(spec), "NORM_TY": _TL[x.dtype], **_gate_consts(spec, False)}
        grid = (-(-m // fwd_cfg.block_m),)
        self.fwd = prebound.Bound(kernels._fwd_rows, grid, {**consts, "STORE_RSTD": False}, x.device)
        self.fwd_rstd = prebound.Bound(kernels._fwd_rows, grid, {**consts, "STORE_RSTD": True}, x.device)
        self.bwd_cfg = bwd_cfg
        self.bwd: dict[tuple, prebound.Bound] = {}
        self.sums: dict[torch.dtype, prebound.Bound] = {}  # the partial-sum kernel, per output dtype
        # dW in the weight's dtype from the partial-sum kernel on a GPU; fp32 under the interpreter (whose
        # bf16 stores truncate), cast afterwards (as launch.backward)
        self.dw_dtype = weight.dtype if weight is not None and x.device.type in prebound.DEVICES else torch.float32
        # the same launches from C++ (prebound.cxx_launch), made after each kernel's first launch: by name,
        # None where unavailable
        self.cxx: dict[Any, Any] = {}
        # calls that record a backward: the C++ autograd node's launches (kernel.cpp's TritonRows), filled in as
        # the launches are made; grad_node = (triton_apply, node) once it has a backward
        self.node: Any = None
        self.grad_node: tuple | None = None
        mod = prebound._cxx_module() if bwd_cfg is not None else None
        if mod is not None:
            handle = next(_HANDLES)
            _ROWS[handle] = self
            _register_slow_backward(mod)
            self.node = mod.TritonRows(handle, spec, x.dtype, self.dw_dtype, bwd_cfg.programs,
                                       not bwd_cfg.acc_in_regs)

    @classmethod
    def build(cls, x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: Spec, be: registry.Backend,
              grad: bool) -> Rows | None:
        """The plan for x's rows, or None where they need another kernel than the row kernels."""
        from . import launch  # (its configuration lookups: one place decides for both routes)

        n = x.shape[-1]
        m = x.numel() // n
        cfg = launch.fwd_config(m, n, x.element_size())
        bcfg = launch.bwd_config(m, n, launch.sm_count(x.device), x.element_size()) if grad else None
        if not cfg.single or (bcfg is not None and not bcfg.single):
            return None
        return cls(x, weight, bias, spec, be, m, n, cfg, bcfg)

    def forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, keep: bool, cxx: bool = True
                ) -> tuple[Tensor, Tensor | None]:
        """(y, rstd if ``keep``) for this key's x; ``cxx``: the C++ launch may serve it (prebound.direct)."""
        launch = self.cxx.get(keep) if cxx else None
        if launch is not None:
            out = launch[0](launch[1], x, weight, bias, self.out_dtype, keep)
            if out is not None:
                return out if keep else (out, None)
        y = torch.empty(self.shape, dtype=self.out_dtype, device=self.device)
        rstd = torch.empty(self.rstd_shape, dtype=torch.float32, device=self.device) if keep else None
        bound = self.fwd_rstd if keep else self.fwd
        w, b, r = x if weight is None else weight, x if bias is None else bias, y if rstd is None else rstd
        args = (x, x, w, b, y, y, r, *self.scalars, x)
        bound(*args)
        if keep not in self.cxx and bound.compiled is not None:
            made = prebound.cxx_launch(bound, args, (x, w, b, y, r))
            self.cxx[keep] = None if made is None else (prebound._cxx_module().triton_forward, made)
            if made is not None and keep and self.node is not None:
                self.node.set_forward(made)
        return y, rstd

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, need_dx: bool,
                 need_dw: bool, need_db: bool) -> tuple | None:
        """(dx, dw, db) (None where not needed), or None when ``dy`` is not laid out as y is."""
        if (dy.__class__ is not Tensor or dy.dtype != self.spec.out_dtype or dy.shape != self.shape
                or not dy.is_contiguous() or dy.is_neg()):
            return None
        key = (need_dw, need_db, dy.data_ptr() & 15)
        cfg, n = self.bwd_cfg, self.n
        launch = self.cxx.get(key)
        if launch is not None and prebound.direct():
            out = launch[0](launch[1], launch[2], launch[3], dy, x, weight, rstd, cfg.programs,
                            not cfg.acc_in_regs, need_dx, need_dw, need_db, self.dw_dtype)
            if out is not None:
                return out
        bound = self.bwd.get(key)
        if bound is None:
            bound = self.bwd[key] = self._bind_backward(need_dw, need_db, weight is not None)
        dx = torch.empty(self.shape, dtype=self.x_dtype, device=self.device)
        alloc = torch.empty if cfg.acc_in_regs else torch.zeros
        dwp = alloc((cfg.programs, n), dtype=torch.float32, device=self.device) if need_dw else None
        dbp = alloc((cfg.programs, n), dtype=torch.float32, device=self.device) if need_db else None
        spec = self.spec
        w, pw, pb = x if weight is None else weight, rstd if dwp is None else dwp, rstd if dbp is None else dbp
        args = (dy, x, x, w, rstd, dx, pw, pb, n, self.stride, self.stride, self.m, n, spec.k, spec.eps, spec.offset,
                x, dx, x)
        bound(*args)
        dw = self._sum(dwp, self.dw_dtype) if dwp is not None else None
        if dw is not None and weight is not None and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)  # (fp32 sums under the interpreter, as in launch.backward)
        db = self._sum(dbp, torch.float32) if dbp is not None else None
        if key not in self.cxx and bound.compiled is not None:
            made = self.cxx[key] = self._cxx_backward(bound, args, (dy, x, w, rstd, dx, pw, pb), need_dw, need_db)
            if made is not None and self.node is not None:
                self.node.set_backward(need_dw, need_db, key[2], made[1])
                if self.cxx.get(True) is not None:
                    self.grad_node = (prebound._cxx_module().triton_apply, self.node)
        return (dx if need_dx else None), dw, db

    def _cxx_backward(self, bound: Any, args: tuple, sources: tuple, need_dw: bool, need_db: bool) -> Any:
        """The C++ backward's launches (backward kernel, partial sums) once all are bound, else None."""
        made = prebound.cxx_launch(bound, args, sources)
        sums = {}
        for need, dtype in ((need_dw, self.dw_dtype), (need_db, torch.float32)):
            if need and not (self.bwd_cfg.programs == 1 and dtype == torch.float32):
                sums[dtype] = self.cxx.get(("sum", dtype))
        if made is None or any(v is None for v in sums.values()):
            return None
        return (prebound._cxx_module().triton_backward, made, sums.get(self.dw_dtype), sums.get(torch.float32))

    def _bind_backward(self, need_dw: bool, need_db: bool, has_w: bool) -> Any:
        from . import kernels
        from .launch import _gate_consts, _round_ty

        cfg, spec = self.bwd_cfg, self.spec
        consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "ACC_IN_REGS": cfg.acc_in_regs,
                  "num_warps": cfg.num_warps, "HAS_DH": False, "HAS_W": has_w, "NEED_DW": need_dw,
                  "NEED_DB": need_db, "PARTIAL": spec.k < self.n, "EPS_OUTSIDE": spec.eps_outside,
                  "ROUND_TY": _round_ty(spec), **_gate_consts(spec, False), "HAS_B": False}
        return prebound.Bound(kernels._bwd_rows, (cfg.programs,), consts, self.device)

    def _sum(self, part: Tensor, dtype: torch.dtype) -> Tensor:
        """The column sums of the per-program partials, in ``dtype`` (see launch._sum_partials)."""
        from . import kernels
        from .launch import SUM_BLOCK

        rows, n = part.shape
        if rows == 1 and dtype == torch.float32:
            return part.view(n)
        out = torch.empty((n,), dtype=dtype, device=self.device)
        bound = self.sums.get(dtype)
        if bound is None:
            bound = self.sums[dtype] = prebound.Bound(kernels._sum_partials, (-(-n // SUM_BLOCK),),
                                                      {"BLOCK_N": SUM_BLOCK, "num_warps": 4}, self.device)
        bound(part, out, rows, n)
        if ("sum", dtype) not in self.cxx and bound.compiled is not None:
            made = self.cxx["sum", dtype] = prebound.cxx_launch(bound, (part, out, rows, n), (part, out))
            if made is not None and self.node is not None:
                self.node.set_sum(dtype, made)
        return out


_registered: list[Any] = []


def _register_slow_backward(mod: Any) -> None:
    if mod not in _registered:
        mod.set_triton_slow_backward(_slow_backward)
        _registered.append(mod)


def _slow_backward(handle: int, spec_fields: tuple, x_dtype: torch.dtype, dy: Tensor | None, x: Tensor,
                   weight: Tensor | None, bias: Tensor | None, rstd: Tensor, needs: tuple[bool, bool, bool]
                   ) -> tuple:
    """The C++ autograd node's backward for what it does not serve itself (see :func:`_input_grads`)."""
    rows = _ROWS.get(handle)
    return _input_grads(rows, Spec(*spec_fields), x_dtype, rows.backend if rows is not None else registry.get("triton"),
                        dy, x, weight, bias, rstd, needs)


def _input_grads(rows: Rows | None, spec: Spec, x_dtype: torch.dtype, backend: registry.Backend, dy: Tensor | None,
                 x: Tensor, weight: Tensor | None, bias: Tensor | None, rstd: Tensor,
                 needs: tuple[bool, bool, bool]) -> tuple:
    """(dx, dw, db) of an entry's call: the row kernels of ``rows`` (binding them on first use) when dy is as y
    is and grad mode is off, else the general backward (create_graph, unusual dy, rows no longer kept)."""
    if rows is not None and dy is not None and not torch.is_grad_enabled():
        out = rows.backward(dy, x, weight, rstd, needs[0], weight is not None and needs[1],
                            bias is not None and needs[2])
        if out is not None:
            dx, dw, db = out
            return dx, dw, (None if db is None or bias is None else db.to(bias.dtype))
    from ... import ops

    ctx = SimpleNamespace(saved_tensors=(x, weight, bias, rstd), needs_input_grad=(*needs, False), spec=spec,
                          x_dtype=x_dtype, backend=backend)
    dx, dw, db, _ = ops._input_grads(ctx, dy, None, ops._backward_direct)
    return dx, dw, db


class EntryFunction(torch.autograd.Function):
    """Autograd for an entry's call: the forward and backward row kernels as bound in :class:`Rows`; a
    backward with create_graph=True or an unusual gradient takes the general backward
    (:func:`rmsnorm.ops._input_grads`, the same saved state as the general route's)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, rows: Rows) -> Tensor:
        y, rstd = rows.forward(x, weight, bias, True, prebound.direct())
        ctx.save_for_backward(x, weight, bias, rstd)
        ctx.rows = rows
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor | None) -> tuple:
        rows: Rows = ctx.rows
        x, weight, bias, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return (*_input_grads(rows, rows.spec, rows.x_dtype, rows.backend, dy, x, weight, bias, rstd,
                              (needs[0], needs[1], needs[2])), None)
