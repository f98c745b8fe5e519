"""Test oracles written independently of the library: float64 math, the authors' formulas, tolerances."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

import rmsnorm


@contextlib.contextmanager
def default_backend(name: str | None) -> Iterator[None]:
    """Every rmsnorm call without a backend of its own goes to ``name`` inside; the default before is restored."""
    from rmsnorm.backends import registry

    before = registry.default()
    registry.set_default(name)
    try:
        yield
    finally:
        registry.set_default(before)


def k_of(n: int, p: float, rounding: str = "ceil") -> int:
    if p >= 1.0:
        return n
    k = math.ceil(p * n - 1e-9) if rounding == "ceil" else math.floor(p * n + 1e-9)
    return max(1, min(n, k))


def math64(x, weight=None, bias=None, *, eps=1e-6, eps_mode="inside", p=1.0, rounding="ceil", offset=0.0,
           residual=None, nd=1):
    """RMSNorm in float64 straight from the definition (differentiable with autograd)."""
    h = x.double() if residual is None else x.double() + residual.double()
    flat = h.flatten(h.dim() - nd)
    n = flat.shape[-1]
    k = k_of(n, p, rounding)
    ms = flat[..., :k].pow(2).mean(-1, keepdim=True)
    r = torch.sqrt(ms + eps) if eps_mode == "inside" else torch.sqrt(ms) + eps
    y = (flat / r).view(h.shape)
    if weight is not None:
        y = y * (weight.double() + offset)
    if bias is not None:
        y = y + bias.double()
    return y


def authors_pytorch(x, scale, eps=1e-8, p=-1.0, offset=None):
    """bzhangGo/rmsnorm rmsnorm_torch.py, forward verbatim (eps outside the root, floor partial)."""
    d = x.shape[-1]
    if p < 0.0 or p > 1.0:
        norm_x = x.norm(2, dim=-1, keepdim=True)
        d_x = d
    else:
        partial_size = int(d * p)
        partial_x, _ = torch.split(x, [partial_size, d - partial_size], dim=-1)
        norm_x = partial_x.norm(2, dim=-1, keepdim=True)
        d_x = partial_size
    rms_x = norm_x * d_x ** (-1.0 / 2)
    x_normed = x / (rms_x + eps)
    if offset is not None:
        return scale * x_normed + offset
    return scale * x_normed


def authors_tf(x, scale, bias=None, eps=1e-8):
    """The authors' TensorFlow layer: x * rsqrt(mean(x^2) + eps) * scale + bias (eps inside)."""
    ms = (x * x).mean(-1, keepdim=True)
    y = x * torch.rsqrt(ms + eps) * scale
    return y + bias if bias is not None else y


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_rule(ours: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, atol: float, what: str = "") -> None:
    """flash-attn's rule: error of ours vs the fp64 truth <= 2 x the same-dtype PyTorch error + atol."""
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    assert not ours.isnan().any(), f"{what}: NaN in output (unwritten element?)"
    e_ours, e_ref = max_err(ours, truth), max_err(ref, truth)
    assert e_ours <= 2 * e_ref + atol, f"{what}: error {e_ours:.3g} > 2 x {e_ref:.3g} + {atol}"


ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def rand(*shape, dtype=torch.float32, device="cpu", seed=None, scale=1.0, shift=0.0):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)


def grads(fn, *tensors):
    """Run fn on fresh leaf copies of tensors (None passes through); return (output, grads)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    ys = out if isinstance(out, tuple) else (out,)
    gs = [rand(*y.shape, dtype=y.dtype, device=y.device, seed=17 + i) for i, y in enumerate(ys)]
    torch.autograd.backward(ys, gs)
    return out, [None if t is None else t.grad for t in leaves]


def available(name: str) -> bool:
    return any(b.name == name and b.available for b in rmsnorm.backends())


def run_with_grads(x, w, b, r, backend, **kw):
    """rms_norm on fresh leaves of (x, weight, bias, residual); returns (output, grads)."""
    return grads(lambda *t: rmsnorm.rms_norm(t[0], t[1], t[2], residual=t[3], backend=backend, **kw), x, w, b, r)


def _up(t):
    return None if t is None else t.double()


def check_against_reference(x, w, b, r, what="", backend="cpu", low_atol_ulps=0.0, **kw):
    """A backend vs the reference: fp32 tight; fp16/bf16 by the 2x-of-PyTorch rule against an fp64 truth.

    ``low_atol_ulps`` widens the low-precision atol by that many ulps of the largest output (Triton's
    interpreter truncates bf16 casts instead of rounding them).
    """
    out, g = run_with_grads(x, w, b, r, backend, **kw)
    ref, gr = run_with_grads(x, w, b, r, "reference", **kw)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    if len(outs) == 2:
        if low_atol_ulps:
            ulp = torch.finfo(outs[1].dtype).eps * (1 + refs[1].abs())
            assert ((outs[1].double() - refs[1].double()).abs() <= low_atol_ulps * ulp).all(), f"{what}: h"
        else:
            assert torch.equal(outs[1], refs[1]), f"{what}: h differs"
    if x.dtype == torch.float32 and (r is None or r.dtype == torch.float32):
        for name, a, e in zip(["y", "dx", "dw", "db", "dres"], (outs[0], *g), (refs[0], *gr)):
            if e is None:
                assert a is None, name
                continue
            assert a.dtype == e.dtype and a.shape == e.shape, name
            scale = 1.0 + e.abs().max().item() if e.numel() else 1.0
            bound = 2e-5 * scale * (1 + x.shape[0] ** 0.5 * (name in ("dw", "db")))
            assert max_err(a, e) <= bound + low_atol_ulps * torch.finfo(a.dtype).eps * scale, (what, name)
        return
    truth_kw = {**kw}
    if "out_dtype" in kw:
        truth_kw.pop("out_dtype")
    truth, gt = run_with_grads(_up(x), _up(w), _up(b), _up(r), "reference", **truth_kw)
    truths = truth if isinstance(truth, tuple) else (truth,)
    atol = ATOL[x.dtype] * 2
    if low_atol_ulps:
        atol += low_atol_ulps * torch.finfo(x.dtype).eps * truths[0].abs().max().item()
    assert_rule(outs[0], refs[0], truths[0], atol, f"{what} y")
    for name, a, e, t in zip(["dx", "dw", "db", "dres"], g, gr, gt):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == e.dtype, name
        scale = 1.0 + t.abs().max().item()
        tol = (atol + low_atol_ulps * torch.finfo(x.dtype).eps * scale) * scale * (
            x.shape[0] ** 0.5 if name in ("dw", "db") else 1.0)
        assert_rule(a, e, t, tol, f"{what} {name}")
