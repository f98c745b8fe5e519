"""The autograd / custom-op layer: where each call goes.

Dispatch table of :func:`run` (first match wins). Before it, a module or ``rms_norm`` call on plain
tensors tries its device's eager entry (:mod:`rmsnorm.backends.entries`), which serves the common case
with the same kernels and results and hands everything else to :func:`run`.

============================================  =========================================================
the call                                      route
============================================  =========================================================
gates and groups (gated RMSNorm)               the gated kernels (cpu: CPU tensors; triton: rows or groups
                                               that fit its row kernel), else :mod:`rmsnorm.composite`
jit tracing, ONNX export, torch.func           :mod:`rmsnorm.composite`
transforms, forward-mode AD, rows of zero
elements
torch.compile / torch.export / tensor          the custom op ``rmsnorm::forward`` (autograd registered;
subclasses (DTensor)                           backend chosen when the op runs, not while tracing)
no gradient needed                             ``backend.forward`` (the kernel, nothing recorded)
gradient needed                                ``backend.autograd`` (cpu: a C++ autograd::Function) or
                                               :class:`KernelFunction` (Python autograd.Function)
============================================  =========================================================

Every backward that runs with ``create_graph=True`` computes its gradients with the differentiable
decomposition (:func:`rmsnorm.composite.input_grads`), so higher derivatives are exact on every route;
first-order backwards stay on the fused kernels. The custom-op dispatcher costs about 15 µs a call, more
than a small norm takes, hence the eager routes.

Both custom ops work on tensors of the caller's shape ``(*batch, *normalized_shape)`` and reshape to rows
internally, so that tensor subclasses (DTensor) see the original shape and layout.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import composite
from .args import compute_dtype
from .backends import registry
from .spec import Spec, decode


def _backend(name: str, x: Tensor, residual: Tensor | None, spec: Spec) -> registry.Backend:
    """The custom ops carry the backend the caller named, or "" for the automatic choice at run time."""
    return registry.select(name or None, x, residual, spec)


def forward_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, spec: Spec,
                 backend: str) -> tuple[Tensor, Tensor | None, Tensor]:
    """One backend's forward on x of shape (*batch, *normalized): (y, h | None, rstd)."""
    return _backend(backend, x, residual, spec).forward(x, weight, bias, residual, spec)


def backward_impl(dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor | None, bias: Tensor | None,
                  rstd: Tensor, spec: Spec, need_dw: bool, need_db: bool, backend: str
                  ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients (d h in h's dtype, dw in weight's dtype | None, db in bias's dtype | None)."""
    return _backend(backend, h, None, spec).backward(dy, dh, h, weight, bias, rstd, spec, need_dw, need_db)


# -------------------------------------------------------------------------------------- custom ops
# The schema holds no objects: the spec travels as its string (rmsnorm.spec.Spec.encode / decode).


@torch.library.custom_op("rmsnorm::forward", mutates_args=())
def forward_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, spec: str,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, rstd); h is an empty tensor without a residual."""
    y, h, rstd = forward_impl(x, weight, bias, residual, decode(spec), backend)
    return y, (h if h is not None else x.new_empty(0)), rstd


@forward_op.register_fake
def _forward_fake(x, weight, bias, residual, spec, backend):
    s = decode(spec)
    h_dtype = residual.dtype if residual is not None else x.dtype
    y = x.new_empty(x.shape, dtype=s.out_dtype)
    h = x.new_empty(x.shape, dtype=h_dtype) if residual is not None else x.new_empty(0)
    rstd = x.new_empty(x.shape[: x.dim() - s.normalized_ndim], dtype=compute_dtype(h_dtype))
    return y, h, rstd


@torch.library.custom_op("rmsnorm::backward", mutates_args=())
def backward_op(dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor | None, bias: Tensor | None,
                rstd: Tensor, spec: str, need_dw: bool, need_db: bool, backend: str
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(dh_total, dw, db); dw/db are empty tensors when not needed."""
    dx, dw, db = backward_impl(dy, dh, h, weight, bias, rstd, decode(spec), need_dw, need_db, backend)
    return dx, (dw if dw is not None else h.new_empty(0)), (db if db is not None else h.new_empty(0))


@backward_op.register_fake
def _backward_fake(dy, dh, h, weight, bias, rstd, spec, need_dw, need_db, backend):
    dw = weight.new_empty(weight.shape) if need_dw else h.new_empty(0)
    db = bias.new_empty(bias.shape) if need_db else h.new_empty(0)
    return h.new_empty(h.shape), dw, db


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, spec, backend = inputs
    _, h, rstd = output
    _save(ctx, x, weight, bias, residual, h, rstd, decode(spec), backend)


def _save(ctx, x, weight, bias, residual, h, rstd, spec: Spec, backend) -> None:
    ctx.save_for_backward(h if residual is not None else x, weight, bias, rstd)
    ctx.x_dtype = x.dtype
    ctx.spec, ctx.backend = spec, backend


def _input_grads(ctx, dy: Tensor | None, dh: Tensor | None, bwd) -> tuple:
    """Gradients for (x, weight, bias, residual) from the saved context and a backward callable; with
    create_graph=True (grad mode on inside the backward), from the differentiable decomposition."""
    h, weight, bias, rstd = ctx.saved_tensors
    spec: Spec = ctx.spec
    if torch.is_grad_enabled():
        return composite.input_grads(dy, dh, h, weight, bias, spec, ctx.x_dtype, tuple(ctx.needs_input_grad[:4]))
    if dy is None:
        dy = torch.zeros_like(h)
    dh = dh if spec.residual else None
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    dgrad, dw, db = bwd(dy, dh, h, weight, bias, rstd, spec, need_dw, need_db, ctx.backend)
    dx = dgrad if dgrad.dtype == ctx.x_dtype else dgrad.to(ctx.x_dtype)
    return dx, (dw if need_dw else None), (db if need_db else None), (dgrad if spec.residual else None)


def _backward_via_op(dy, dh, h, weight, bias, rstd, spec, need_dw, need_db, backend):
    return backward_op(dy, dh, h, weight, bias, rstd, spec.encode(), need_dw, need_db, backend)


def _autograd_backward(ctx, dy, dh, _drstd):
    dx, dw, db, dres = _input_grads(ctx, dy, dh, _backward_via_op)
    return dx, dw, db, dres, None, None


forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------- eager autograd


def _backward_direct(dy, dh, h, weight, bias, rstd, spec, need_dw, need_db, be: registry.Backend):
    return be.backward(dy, dh, h, weight, bias, rstd, spec, need_dw, need_db)


class KernelFunction(torch.autograd.Function):
    """Eager-mode autograd over a backend's kernels (same math and saved state as the custom op); ``backend``
    is the selected :class:`~rmsnorm.backends.registry.Backend`, which the backward calls directly."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, spec, backend: registry.Backend):
        y, h, rstd = backend.forward(x, weight, bias, residual, spec)
        _save(ctx, x, weight, bias, residual, h, rstd, spec, backend)
        ctx.set_materialize_grads(False)
        if h is None:
            return y
        return y, h

    @staticmethod
    def backward(ctx, dy, dh=None):
        dx, dw, db, dres = _input_grads(ctx, dy, dh, _backward_direct)
        return dx, dw, db, dres, None, None


def _gated(x: Tensor, weight: Tensor | None, bias: Tensor | None, gate: Tensor | None, spec: Spec,
           backend: str | None) -> Tensor:
    """A gated or grouped call: the fused gated kernels where they serve it (cpu: CPU tensors; triton: rows
    or groups that fit the row kernels), else plain torch ops (:func:`rmsnorm.composite.gated`:
    torch.compile, subclasses, transforms, the reference backend, longer rows on CUDA)."""
    name = backend or registry.default()
    if name is not None:
        registry.get(name)  # an unknown name: the registry's error
    if name not in (None, "cpu", "reference", "triton"):
        raise ValueError(f"backend={name!r} has no gated or grouped kernel: use 'cpu', 'triton' or 'reference'")
    dev = x.device.type
    if name == "cpu" and dev != "cpu":
        raise ValueError(f"backend='cpu' cannot handle x on {x.device}")
    tensors = [t for t in (x, weight, bias, gate) if t is not None]
    plain = not (torch.compiler.is_compiling() or _decomposed() or x.numel() == 0
                 or any(type(t) is not Tensor and not isinstance(t, torch.nn.Parameter) for t in tensors)
                 or any(t.dtype not in _KERNEL_DTYPES for t in tensors) or spec.out_dtype not in _KERNEL_DTYPES)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if plain and grad and (x.is_inference() or (gate is not None and gate.is_inference())):
        x = x.clone()  # an inference tensor cannot be saved for backward
        gate = gate.clone() if gate is not None else None
    if plain and name != "reference" and dev == "cpu" and name != "triton" and (
            registry.get("cpu").unavailable_reason() is None):
        from .backends import cpu

        return (cpu.gated_autograd if grad else cpu.gated_forward)(x, weight, bias, gate, spec)
    if plain and (gate is not None or spec.group) and (name == "triton" or (name is None and dev == "cuda")):
        be = registry.get("triton")
        if be.unavailable_reason() is None and be.unsupported_reason(x, None, spec) is None:
            from .backends import triton

            y = triton.gated_call(x, weight, bias, gate, spec)
            if y is not None:
                return y
    return composite.gated(x, weight, bias, gate, spec)


_KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})  # what the gated kernels take


def _decomposed() -> bool:
    """Calls the kernels cannot serve: jit tracing (and the legacy ONNX exporter), torch.func transforms,
    forward-mode AD (inside ``torch.autograd.forward_ad.dual_level``: the kernels carry no tangents)."""
    return (torch._C._get_tracing_state() is not None or torch._C._are_functorch_transforms_active()
            or _forward_ad._current_level >= 0)


def run(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, spec: Spec,
        backend: str | None, gate: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Route one checked call (see the table in the module docstring); ``backend`` as the user named it."""
    if not spec.kernel_plain:
        return _gated(x, weight, bias, gate, spec, backend), None
    if type(x) is not Tensor or torch.compiler.is_compiling():
        if spec.k == 0 or torch.onnx.is_in_onnx_export():
            return composite.forward(x, weight, bias, residual, spec)
        if type(x).__name__ == "DTensor":
            from .distributed import register_dtensor_rules

            register_dtensor_rules()
        y, h, _ = forward_op(x, weight, bias, residual, spec.encode(), backend or "")
        return y, (h if residual is not None else None)
    if spec.k == 0 or _decomposed():
        return composite.forward(x, weight, bias, residual, spec)
    be = registry.select(backend, x, residual, spec)
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    ):
        if x.is_inference() or (residual is not None and residual.is_inference()):
            # an inference-mode tensor cannot be saved for backward; torch's module accepts it, so do we
            x = x.clone()
            residual = residual.clone() if residual is not None else None
        if be.autograd is not None:
            return be.autograd(x, weight, bias, residual, spec)
        out = KernelFunction.apply(x, weight, bias, residual, spec, be)
        return out if residual is not None else (out, None)
    y, h, _ = be.forward(x, weight, bias, residual, spec)
    return y, h
