"""RMSNorm as plain, differentiable torch ops: the decomposition used where the fused kernels cannot go.

Same math as :mod:`rmsnorm.reference` (statistics in fp32, fp64 for fp64), but every step is an
autograd-visible torch op, so it serves the paths that need a graph rather than a kernel:

- second derivatives: a backward run with ``create_graph=True`` computes the first derivatives as
  differentiable ops (:func:`input_grads`), so double backward, Hessian-vector products and gradient
  penalties are exact on every backend;
- ``torch.func`` transforms (vmap, grad, jacrev, jvp, ...), ``torch.jit.trace`` and ONNX export, which
  trace or batch ops rather than call kernels (:func:`forward`);
- rows of zero elements (an empty normalized shape), where there is nothing to launch.

Where the options are exactly torch's (p = 1, eps inside the root, no offset or bias, fp32 numerics, the
input's dtype out) the norm is ``F.rms_norm`` itself, so torch.export sees ``aten::rms_norm`` (the dynamo
ONNX exporter: RMSNormalization from opset 23); jit tracing always gets the decomposition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .args import compute_dtype
from .reference import rounded_rstd
from .spec import Spec


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
            spec: Spec) -> tuple[Tensor, Tensor | None]:
    """(y, h | None) for x of shape (*batch, *normalized); ``spec.normalized_ndim`` trailing dims are normalized."""
    if residual is not None:
        cd = compute_dtype(residual.dtype)
        h = (x.to(cd) + residual.to(cd)).to(residual.dtype)
    else:
        h = x
    return normalize(h, weight, bias, spec), (h if residual is not None else None)


def _is_torch_rms_norm(h: Tensor, weight: Tensor | None, bias: Tensor | None, spec: Spec) -> bool:
    nd = spec.normalized_ndim
    n = 1
    for s in h.shape[h.dim() - nd:]:
        n *= s
    # the TorchScript-based ONNX exporter has no aten::rms_norm: jit tracing gets the decomposition
    return (torch._C._get_tracing_state() is None and spec.k == n and n > 0 and not spec.eps_outside
            and spec.offset == 0.0 and spec.round_to is None and bias is None
            and spec.out_dtype == h.dtype and (weight is None or weight.dtype == h.dtype))


def normalize(h: Tensor, weight: Tensor | None, bias: Tensor | None, spec: Spec) -> Tensor:
    """y = h / r * (weight + offset) + bias, r over the first k elements of each flattened row."""
    nd = spec.normalized_ndim
    if _is_torch_rms_norm(h, weight, bias, spec):
        return F.rms_norm(h, tuple(h.shape[h.dim() - nd:]), weight, spec.eps)
    cd = compute_dtype(h.dtype)
    return _affine(_normalized(h.to(cd), spec), weight, bias, spec, cd, spec.out_dtype)


def _normalized(h: Tensor, spec: Spec, group: int = 0) -> Tensor:
    """h / r in h's shape (h in the compute dtype): r over the first k elements of each flattened row, or
    with ``group`` over each run of that many elements."""
    nd = spec.normalized_ndim
    flat = h.flatten(h.dim() - nd) if nd > 1 else h
    n = flat.shape[-1]
    rows = flat.unflatten(-1, (n // group, group)) if group else flat
    head = rows if group or spec.k >= n else rows[..., : spec.k]
    ms = head.square().mean(-1, keepdim=True)
    if spec.eps_outside:
        # sqrt'(0) is infinite: the subgradient 0 at an all-zero prefix, as the kernels use
        pos = ms > 0
        root = torch.where(pos, ms, torch.ones_like(ms)).sqrt() * pos
        if spec.rstd_round is None:
            xhat = rows / (root + spec.eps)
        else:
            xhat = rows * rounded_rstd(1.0 / (root + spec.eps), spec)
    else:
        xhat = rows * rounded_rstd(torch.rsqrt(ms + spec.eps), spec)
    return xhat.flatten(-2).view(h.shape) if group else xhat.view(h.shape)


def gated(x: Tensor, weight: Tensor | None, bias: Tensor | None, gate: Tensor | None, spec: Spec) -> Tensor:
    """Gated and grouped RMSNorm (``spec.gate``, ``spec.group``), with the operations of the Hugging Face
    implementations: a = act(z) in the compute dtype; "before": the norm of x * a; "after": u * a with u the
    norm of x (rounded through ``spec.gate_round`` first); groups: the RMS over consecutive groups of a row."""
    cd = compute_dtype(x.dtype)
    a = None
    if gate is not None:
        zf = gate.to(cd)
        a = F.silu(zf) if spec.gate_act == "silu" else torch.sigmoid(zf)
    h = x.to(cd) * a if spec.gate == "before" and a is not None else x.to(cd)
    u = _affine(_normalized(h, spec, spec.group), weight, bias, spec, cd,
                cd if spec.gate == "after" else spec.out_dtype)
    if spec.gate != "after" or a is None:
        return u
    if spec.gate_round is not None:
        u = u.to(spec.gate_round).to(cd)
    return (u * a).to(spec.out_dtype)


def gated_graph_grads(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, gate: Tensor | None,
                      spec: Spec, needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The gradients of a gated call for (x, weight, bias, gate) as differentiable ops of the saved inputs
    themselves: the backward of the fused gated kernels when create_graph=True."""
    inputs = [t for t, need in zip((x, weight, bias, gate), needs, strict=True) if need and t is not None]
    got = iter(torch.autograd.grad(gated(x, weight, bias, gate, spec), inputs, dy, create_graph=True))
    return tuple(next(got) if need and t is not None else None
                 for t, need in zip((x, weight, bias, gate), needs, strict=True))


def gated_backward(ctx: Any, dy: Tensor, kernel: Callable[..., tuple]) -> tuple[Tensor | None, ...]:
    """The backward of a fused gated ``autograd.Function`` that saved (x, weight, bias, gate, rstd) and
    ``ctx.spec``: with create_graph=True the differentiable gradients above, else
    ``kernel(dy, x, weight, bias, gate, rstd, need_dw, need_db)`` -> (dx, dz, dw, db) in the inputs'
    dtypes and shapes. Returns the gradients of (x, weight, bias, gate, spec)."""
    x, weight, bias, gate, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled():
        return (*gated_graph_grads(dy, x, weight, bias, gate, ctx.spec, needs), None)
    need_dw = weight is not None and needs[1]
    need_db = bias is not None and needs[2]
    dx, dz, dw, db = kernel(dy, x, weight, bias, gate, rstd, need_dw, need_db)
    return (dx if needs[0] else None, dw if need_dw else None, db if need_db else None,
            dz if gate is not None and needs[3] else None, None)


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None, spec: Spec, cd: torch.dtype,
            out: torch.dtype) -> Tensor:
    """The cast's rounding, the gain and the bias on normalized rows, in ``out`` (as :func:`normalize` ends)."""
    if spec.round_to is not None:
        xhat = xhat.to(spec.round_to).to(cd)
    if weight is not None:
        xhat = xhat * (weight.to(cd) + spec.offset)
    if bias is not None:
        xhat = xhat + bias.to(cd)
    return xhat.to(out)


def input_grads(dy: Tensor | None, dh: Tensor | None, h: Tensor, weight: Tensor | None, bias: Tensor | None,
                spec: Spec, x_dtype: torch.dtype, needs: tuple[bool, bool, bool, bool]
                ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for (x, weight, bias, residual) written as differentiable torch ops of the saved h, weight
    and bias (the backward formula of :mod:`rmsnorm.reference`, with rstd recomputed from h): what a
    backward computes when it runs with ``create_graph=True``, so higher derivatives flow through it.

    No autograd call happens in here (a backward that started another backward through its own node
    would wait on that node's lock). ``h`` is what the forward normalized (x, or x + residual); ``needs``
    says which inputs want a gradient; dy (or dh) may be None when that output got no gradient.
    """
    nd, has_residual = spec.normalized_ndim, spec.residual
    need_h = needs[0] or needs[3]
    need_w = needs[1] and weight is not None
    need_b = needs[2] and bias is not None
    cd = compute_dtype(h.dtype)
    batch = h.shape[: h.dim() - nd]
    hf = h.to(cd).reshape(*batch, -1)
    n = hf.shape[-1]
    gh = gw = gb = None
    if dy is not None:
        dyf = dy.to(cd).reshape(*batch, -1)
        k = min(spec.k, n)
        ms = hf[..., :k].square().mean(-1, keepdim=True)
        if spec.eps_outside:
            pos = ms > 0
            root = torch.where(pos, ms, torch.ones_like(ms)).sqrt()
            rstd = 1.0 / (root * pos + spec.eps)
            c = torch.where(pos, rstd * rstd / (k * root), torch.zeros_like(ms))
        else:
            rstd = torch.rsqrt(ms + spec.eps)
            c = rstd * rstd * rstd / k
        if need_h:
            dyg = dyf * (weight.to(cd).reshape(-1) + spec.offset) if weight is not None else dyf
            s = (dyg * hf).sum(-1, keepdim=True)
            d = dyg * rstd
            corr = hf[..., :k] * (c * s)
            d = d - corr if k == n else torch.cat([d[..., :k] - corr, d[..., k:]], dim=-1)
            gh = d.reshape(h.shape)
        rows = tuple(range(len(batch)))
        if need_w and weight is not None:
            xhat = hf * rounded_rstd(rstd, spec)
            if spec.round_to is not None:
                xhat = xhat.to(spec.round_to).to(cd)
            gw = (dyf * xhat).sum(rows).reshape(weight.shape).to(weight.dtype)
        if need_b and bias is not None:
            gb = dyf.sum(rows).reshape(bias.shape).to(bias.dtype)
    if need_h:
        if gh is None:
            gh = torch.zeros_like(h, dtype=cd)
        if has_residual and dh is not None:
            gh = gh + dh.to(cd)
        gh = gh.to(h.dtype)
    if need_w and gw is None and weight is not None:
        gw = torch.zeros_like(weight)
    if need_b and gb is None and bias is not None:
        gb = torch.zeros_like(bias)
    dx = None if gh is None or not needs[0] else (gh if gh.dtype == x_dtype else gh.to(x_dtype))
    dres = gh if (needs[3] and has_residual) else None
    return dx, gw, gb, dres


def graph_backward(dy: Tensor | None, dh: Tensor | None, h: Tensor, weight: Tensor | None, bias: Tensor | None,
                   spec_fields: tuple, x_dtype: torch.dtype, needs: tuple[bool, bool, bool, bool]
                   ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`input_grads` with the spec as the tuple of its fields: what the C++ autograd node calls back."""
    return input_grads(dy, dh, h, weight, bias, Spec(*spec_fields), x_dtype, needs)
