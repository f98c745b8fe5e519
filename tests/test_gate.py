"""Gated and grouped RMSNorm: bit for bit the Hugging Face implementations, exact gradients (fp64 gradcheck and
gradgradcheck), clear refusals."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import rmsnorm
from rmsnorm.spec import Spec, decode


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mamba2_family_bit_for_bit(dtype):
    hf = _hf("mamba2", "MambaRMSNormGated")(64, group_size=16, eps=1e-5).to(dtype)
    ours = rmsnorm.GatedRMSNorm(64, eps=1e-5, group_size=16, gate_mode="before", cast="llama", dtype=dtype)
    with torch.no_grad():
        hf.weight.normal_()
        ours.weight.copy_(hf.weight)
    x, z = torch.randn(3, 5, 64).to(dtype), torch.randn(3, 5, 64).to(dtype)
    for gate in (z, None):
        want, got = hf(x, gate), ours(x, gate)
        assert got.dtype == want.dtype and torch.equal(got, want)


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
    got = rmsnorm.rms_norm(x, hf.weight, eps=1e-6, gate=z, gate_mode="after", gate_act=hf.activation, cast=cast)
    want = hf(x, z)
    assert got.dtype == want.dtype and torch.equal(got, want)


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
    with pytest.raises(ValueError, match="no gated or grouped kernel"):
        rmsnorm.rms_norm(x, w, gate=x, backend="cpu")
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
    for dtype in (torch.float32, torch.bfloat16):
        a, b = copy.deepcopy(original).to(dtype), copy.deepcopy(holder["norm"]).to(dtype)
        x, z = torch.randn(2, 3, 64).to(dtype), torch.randn(2, 3, 64).to(dtype)
        assert torch.equal(a(x, z), b(x, z))
