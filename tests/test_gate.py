"""Gated and grouped RMSNorm: bit for bit the Hugging Face implementations, exact gradients (fp64 gradcheck and
gradgradcheck), clear refusals."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import rmsnorm
from rmsnorm.spec import Spec, decode

from helpers import default_backend


def _oracle(x, w, z, *, mode, act="silu", group=None, eps=1e-6):
    """Gated RMSNorm in fp64 from the definition, written independently of the library."""
    x, w, z = x.double(), w.double(), z.double()
    a = F.silu(z) if act == "silu" else torch.sigmoid(z)
    h = x * a if mode == "before" else x
    n = h.shape[-1]
    g = group or n
    hg = h.reshape(*h.shape[:-1], n // g, g)
    y = (hg / torch.sqrt(hg.pow(2).mean(-1, keepdim=True) + eps)).reshape(h.shape) * w
    return y * a if mode == "after" else y


def _hf(module: str, cls: str):
    transformers = pytest.importorskip("transformers")
    assert transformers
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)


def _close(got, want):
    """The fused kernels' targets: fp32 within 1e-5 of the scale, half precision within one ulp."""
    assert got.dtype == want.dtype
    scale = 1 + want.float().abs().max().item()
    if want.dtype == torch.float32:
        assert (got - want).abs().max().item() <= 1e-5 * scale
    else:
        ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(1e-3)
        assert ((got.float() - want.float()).abs() <= ulp * 1.0001).all()


def _agrees_with(original, replaced):
    """A replacement gated norm against the module it replaced: within the targets on the default backend,
    bit for bit on the reference backend, in fp32 and bf16."""
    import copy

    for dtype in (torch.float32, torch.bfloat16):
        a, b = copy.deepcopy(original).to(dtype), copy.deepcopy(replaced).to(dtype)
        x, z = torch.randn(2, 3, 64).to(dtype), torch.randn(2, 3, 64).to(dtype)
        _close(b(x, z), a(x, z))
        with default_backend("reference"):
            assert torch.equal(a(x, z), b(x, z))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mamba2_family(dtype):
    """Bit for bit on the reference backend (the same torch operations); the fused kernels within targets."""
    hf = _hf("mamba2", "MambaRMSNormGated")(64, group_size=16, eps=1e-5).to(dtype)
    ours = {be: rmsnorm.GatedRMSNorm(64, eps=1e-5, group_size=16, gate_mode="before", cast="llama", dtype=dtype,
                                     backend=be) for be in ("reference", "cpu")}
    with torch.no_grad():
        hf.weight.normal_()
        for m in ours.values():
            m.weight.copy_(hf.weight)
    x, z = torch.randn(3, 5, 64).to(dtype), torch.randn(3, 5, 64).to(dtype)
    for gate in (z, None):
        want = hf(x, gate)
        got = ours["reference"](x, gate)
        assert got.dtype == want.dtype and torch.equal(got, want)
        _close(ours["cpu"](x, gate), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("module,cls,cast", [("qwen3_next", "Qwen3NextRMSNormGated", "llama"),
                                             ("olmo_hybrid", "OlmoHybridRMSNormGated", "llama"),
                                             ("kimi_linear", "KimiLinearRMSNormGated", "fp32"),
                                             ("bailing_hybrid", "BailingHybridRMSNormGated", "fp32")])
def test_norm_then_gate_families_bit_for_bit(module, cls, cast, dtype):
    hf = _hf(module, cls)(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.normal_()
    x, z = torch.randn(4, 48).to(dtype), torch.randn(4, 48).to(dtype)
    want = hf(x, z)
    for backend in ("reference", "cpu"):
        got = rmsnorm.rms_norm(x, hf.weight, eps=1e-6, gate=z, gate_mode="after", gate_act=hf.activation, cast=cast,
                               backend=backend)
        if backend == "reference":
            assert got.dtype == want.dtype and torch.equal(got, want)
        else:
            _close(got, want)


@pytest.mark.parametrize("mode", ["before", "after"])
@pytest.mark.parametrize("act", ["silu", "sigmoid"])
@pytest.mark.parametrize("group", [None, 4])
def test_values_and_gradients_match_the_definition(mode, act, group):
    g = torch.Generator().manual_seed(5)
    x, z = torch.randn(3, 2, 12, generator=g), torch.randn(3, 2, 12, generator=g)
    w = torch.randn(12, generator=g)
    y = rmsnorm.rms_norm(x, w, gate=z, gate_mode=mode, gate_act=act, group_size=group)
    torch.testing.assert_close(y, _oracle(x, w, z, mode=mode, act=act, group=group).float(), rtol=1e-5,
                               atol=1e-5)
    args = [t.double().requires_grad_(True) for t in (x[:, :1, :8], w[:8], z[:, :1, :8])]

    def f(xx, ww, zz):
        return rmsnorm.rms_norm(xx, ww, gate=zz, gate_mode=mode, gate_act=act, group_size=group and 4)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_module_options_and_spec_round_trip():
    m = rmsnorm.RMSNorm(32, group_size=8, gate_mode="before", gate_act="sigmoid")
    x, z = torch.randn(2, 32), torch.randn(2, 32)
    torch.testing.assert_close(m(x, gate=z), _oracle(x, m.weight, z, mode="before", act="sigmoid", group=8,
                                                     eps=torch.finfo(torch.float32).eps).float())
    spec = Spec(1, 32, 1e-6, False, 0.0, torch.bfloat16, torch.float32, False, "after", "sigmoid", 8, torch.bfloat16)
    assert decode(spec.encode()) == spec


def test_refusals_name_the_argument():
    x, w = torch.randn(2, 12), torch.ones(12)
    with pytest.raises(ValueError, match="gate must have the shape of x"):
        rmsnorm.rms_norm(x, w, gate=torch.randn(2, 11))
    with pytest.raises(ValueError, match="gate and residual cannot be combined"):
        rmsnorm.rms_norm(x, w, gate=x, residual=x)
    with pytest.raises(ValueError, match="does not divide"):
        rmsnorm.rms_norm(x, w, group_size=5)
    with pytest.raises(ValueError, match="p < 1"):
        rmsnorm.rms_norm(x, w, group_size=4, p=0.5)
    with pytest.raises(ValueError, match="gate_mode must be one of"):
        rmsnorm.rms_norm(x, w, gate=x, gate_mode="middle")
    with pytest.raises(ValueError, match="gate_act must be one of"):
        rmsnorm.RMSNorm(12, gate_act="gelu")
    with pytest.raises(TypeError, match="group_size must be a positive int"):
        rmsnorm.RMSNorm(12, group_size=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        rmsnorm.rms_norm(x, w, gate=x, backend="nope")
    torch.testing.assert_close(rmsnorm.rms_norm(x, w, gate=x, backend="reference"), rmsnorm.rms_norm(x, w, gate=x))


def test_compiles_in_one_graph():
    m = rmsnorm.GatedRMSNorm(16, group_size=4, gate_mode="before", cast="llama")
    x, z = torch.randn(3, 16), torch.randn(3, 16)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, z), m(x, z))


@pytest.mark.parametrize("module,cls,kwargs", [("mamba2", "MambaRMSNormGated", {"group_size": 16}),
                                               ("qwen3_next", "Qwen3NextRMSNormGated", {}),
                                               ("kimi_linear", "KimiLinearRMSNormGated", {})])
def test_accelerate_replaces_gated_norms_with_identical_numbers(module, cls, kwargs):
    hf = _hf(module, cls)(64, eps=1e-5, **kwargs)
    with torch.no_grad():
        hf.weight.normal_()
    holder = torch.nn.ModuleDict({"norm": hf})
    import copy

    original = copy.deepcopy(hf)
    report = rmsnorm.accelerate(holder)
    assert len(report.changed) == 1 and isinstance(holder["norm"], rmsnorm.GatedRMSNorm), str(report)
    assert holder["norm"].weight is hf.weight  # shared, not copied
    _agrees_with(original, holder["norm"])


@pytest.mark.parametrize("mode", ["before", "after", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [dict(group_size=8, cast="llama"), dict(eps_mode="outside", offset=1.0, bias=True),
                                  dict(gate_act="sigmoid", cast="llama", bias=True), dict(p=0.5)])
def test_cpu_kernels_match_the_reference(mode, dtype, opts, poison):
    """The fused gated kernels against the decomposition: outputs, and gradients of every input."""
    opts = dict(opts)
    if mode is None and "group_size" not in opts:
        opts["group_size"] = 4  # no gate: a grouped call
    if "group_size" in opts and opts.get("p", 1.0) < 1:
        return
    bias = opts.pop("bias", False)
    g = torch.Generator().manual_seed(11)
    x, z = (torch.randn(7, 3, 40, generator=g) * 2).to(dtype), torch.randn(7, 3, 40, generator=g).to(dtype)
    w, b = torch.randn(40, generator=g).to(dtype), (torch.randn(40, generator=g).to(dtype) if bias else None)
    kw = dict(eps=1e-5, gate=z if mode else None, gate_mode=mode or "after", **opts)
    outs, grads = {}, {}
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b, kw["gate"])]
        y = rmsnorm.rms_norm(leaves[0], leaves[1], leaves[2], backend=backend, **{**kw, "gate": leaves[3]})
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
        outs[backend] = y
        grads[backend] = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    scale = 1 + outs["reference"].float().abs().max().item()
    assert outs["cpu"].dtype == outs["reference"].dtype
    assert (outs["cpu"].float() - outs["reference"].float()).abs().max().item() <= tol * scale
    for a, c in zip(grads["cpu"], grads["reference"], strict=True):
        s_ = 1 + c.float().abs().max().item()
        assert a.dtype == c.dtype and (a.float() - c.float()).abs().max().item() <= 4 * tol * s_ * (7 * 3) ** 0.5


def test_double_backward_through_the_gated_kernels():
    g = torch.Generator().manual_seed(2)
    x, z, w = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(16, generator=g)
    res = {}
    for backend in ("cpu", "reference"):
        xs, zs, ws = (t.clone().requires_grad_(True) for t in (x, z, w))
        y = rmsnorm.rms_norm(xs, ws, gate=zs, gate_mode="before", group_size=4, backend=backend)
        (gx,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
        res[backend] = torch.autograd.grad(gx.sum(), (xs, zs, ws))
    for a, c in zip(res["cpu"], res["reference"], strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("n_groups", [1, 4])
def test_falcon_h1_gated_norm_both_forms(norm_before_gate, n_groups):
    import copy

    hf = _hf("falcon_h1", "FalconH1RMSNormGated")(64, eps=1e-6, n_groups=n_groups, norm_before_gate=norm_before_gate)
    with torch.no_grad():
        hf.weight.normal_()
    holder = torch.nn.ModuleDict({"norm": copy.deepcopy(hf)})
    assert len(rmsnorm.accelerate(holder).changed) == 1
    _agrees_with(hf, holder["norm"])
