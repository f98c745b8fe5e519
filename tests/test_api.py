"""Public API: the module as a drop-in for torch.nn.RMSNorm, argument errors, backend selection, the CLI."""

import inspect
import os
import subprocess
import sys

import pytest
import torch

import rmsnorm
from rmsnorm.backends import registry
from rmsnorm.spec import plain

from helpers import math64, max_err, rand


def test_signatures_are_as_specified():
    sig = inspect.signature(rmsnorm.rms_norm)
    assert list(sig.parameters)[:13] == ["x", "weight", "bias", "eps", "eps_mode", "p", "partial_rounding",
                                          "offset", "residual", "cast", "out_dtype", "backend",
                                          "normalized_shape"]
    assert sig.parameters["eps"].default == 1e-6 and sig.parameters["cast"].default == "fp32"
    msig = inspect.signature(rmsnorm.RMSNorm.__init__)
    torch_params = list(inspect.signature(torch.nn.RMSNorm.__init__).parameters)
    ours = list(msig.parameters)
    assert ours[:4] == torch_params[:4] == ["self", "normalized_shape", "eps", "elementwise_affine"]
    assert {"bias", "p", "eps_mode", "partial_rounding", "offset", "cast", "device", "dtype"} <= set(ours)


def test_module_drop_in_for_torch():
    ref = torch.nn.RMSNorm([4, 8], eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(rand(4, 8))
    mod = rmsnorm.RMSNorm([4, 8], 1e-5)
    assert set(mod.state_dict()) == set(ref.state_dict()) == {"weight"}
    mod.load_state_dict(ref.state_dict())
    x = rand(3, 5, 4, 8)
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-6, atol=1e-6)
    assert rmsnorm.RMSNorm(8, elementwise_affine=False).weight is None
    assert set(rmsnorm.RMSNorm(8, bias=True).state_dict()) == {"weight", "bias"}
    # parameters train like torch's
    x.requires_grad_(True)
    mod(x).square().sum().backward()
    assert mod.weight.grad is not None and mod.weight.grad.shape == (4, 8)


def test_module_options_and_repr():
    m = rmsnorm.RMSNorm(64, p=0.0625, eps_mode="outside", offset=1.0, bias=True, cast="llama")
    r = repr(m)
    for s in ["(64,)", "p=0.0625 (k=4", "eps_mode='outside'", "offset=1.0", "bias=True", "cast='llama'"]:
        assert s in r, r
    assert torch.equal(m.weight + m.offset, torch.ones(64))  # gain initialised to 1
    assert m.k == 4
    y, h = m(rand(2, 64), residual=rand(2, 64))
    assert y.shape == h.shape == (2, 64)


def test_module_fast_path_follows_changes():
    """The module caches its checked arguments per (dtypes, devices, options): changing any of them, or
    calling with a bad shape, must act exactly as the functional API does."""
    m = rmsnorm.RMSNorm(16, eps=1e-5, bias=True)
    with torch.no_grad():
        m.weight.copy_(rand(16))
        m.bias.copy_(rand(16))
    x = rand(3, 16)
    f = lambda t, **kw: rmsnorm.rms_norm(t, m.weight, m.bias, **{"eps": m.eps, "p": m.p, "eps_mode": m.eps_mode,
                                                                  "offset": m.offset, **kw})
    assert torch.equal(m(x), f(x))
    m.eps, m.p, m.eps_mode = 0.5, 0.25, "outside"
    assert torch.equal(m(x), f(x))
    assert torch.equal(m(x.double()), f(x.double()))
    assert m(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="x of shape"):
        m(rand(3, 15))
    with pytest.raises(ValueError, match="x of shape"):
        m(rand(16)[:0].reshape(0))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        m(torch.ones(3, 16, dtype=torch.int64))
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()
    assert xg.grad is not None and m.weight.grad is not None and m.bias.grad is not None


def test_from_layernorm():
    ln = torch.nn.LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(rand(32))
        ln.bias.copy_(rand(32))
    m = rmsnorm.RMSNorm.from_layernorm(ln, keep_bias=True, p=0.5)
    assert torch.equal(m.weight, ln.weight) and torch.equal(m.bias, ln.bias) and m.eps == 1e-5 and m.p == 0.5
    x = rand(6, 32)
    x = x - x.mean(-1, keepdim=True)  # zero-mean inputs: RMSNorm == LayerNorm
    full = rmsnorm.RMSNorm.from_layernorm(ln, keep_bias=True)
    torch.testing.assert_close(full(x), ln(x), rtol=1e-5, atol=1e-5)
    assert rmsnorm.RMSNorm.from_layernorm(ln).bias is None
    with pytest.raises(TypeError, match="ln"):
        rmsnorm.RMSNorm.from_layernorm(torch.nn.Linear(2, 2))


BAD = [
    (lambda x, w: rmsnorm.rms_norm(x.long(), None), TypeError, "x"),
    (lambda x, w: rmsnorm.rms_norm(x.to(torch.complex64), None), TypeError, "x"),
    (lambda x, w: rmsnorm.rms_norm(x.tolist(), None), TypeError, "x"),
    (lambda x, w: rmsnorm.rms_norm(x, w[:-1]), ValueError, "from weight"),
    (lambda x, w: rmsnorm.rms_norm(x, w[:-1], normalized_shape=16), ValueError, "weight"),
    (lambda x, w: rmsnorm.rms_norm(x, w, normalized_shape=8), ValueError, "weight must have"),
    (lambda x, w: rmsnorm.rms_norm(x, normalized_shape=8), ValueError, "x of shape"),
    (lambda x, w: rmsnorm.rms_norm(x, w.long()), TypeError, "weight"),
    (lambda x, w: rmsnorm.rms_norm(x, w.to("meta")), ValueError, "weight"),
    (lambda x, w: rmsnorm.rms_norm(x, w, w[:3]), ValueError, "bias"),
    (lambda x, w: rmsnorm.rms_norm(x, w, p=0.0), ValueError, "p"),
    (lambda x, w: rmsnorm.rms_norm(x, w, p=-0.5), ValueError, "p"),
    (lambda x, w: rmsnorm.rms_norm(x, w, p=1.5), ValueError, "p"),
    (lambda x, w: rmsnorm.rms_norm(x, w, p=float("nan")), ValueError, "p"),
    (lambda x, w: rmsnorm.rms_norm(x, w, eps=-1e-6), ValueError, "eps"),
    (lambda x, w: rmsnorm.rms_norm(x, w, eps=float("nan")), ValueError, "eps"),
    (lambda x, w: rmsnorm.rms_norm(x, w, residual=x[:, :4]), ValueError, "residual"),
    (lambda x, w: rmsnorm.rms_norm(x, w, residual=x.int()), TypeError, "residual"),
    (lambda x, w: rmsnorm.rms_norm(x, w, backend="nope"), ValueError, "backend"),
    (lambda x, w: rmsnorm.rms_norm(x, w, eps_mode="middle"), ValueError, "eps_mode"),
    (lambda x, w: rmsnorm.rms_norm(x, w, cast="fp16"), ValueError, "cast"),
    (lambda x, w: rmsnorm.rms_norm(x, w, partial_rounding="round"), ValueError, "partial_rounding"),
    (lambda x, w: rmsnorm.rms_norm(x, w, out_dtype=torch.int32), TypeError, "out_dtype"),
    (lambda x, w: rmsnorm.rms_norm(x, None, offset=1.0), ValueError, "offset"),
    (lambda x, w: rmsnorm.RMSNorm(16, p=0), ValueError, "p"),
    (lambda x, w: rmsnorm.RMSNorm(16, eps=-1.0), ValueError, "eps"),
    (lambda x, w: rmsnorm.RMSNorm(16, eps_mode="x"), ValueError, "eps_mode"),
    (lambda x, w: rmsnorm.RMSNorm(-1), ValueError, "normalized_shape"),
    (lambda x, w: rmsnorm.RMSNorm([8.7]), TypeError, "normalized_shape"),
    (lambda x, w: rmsnorm.RMSNorm("12"), TypeError, "normalized_shape"),
    (lambda x, w: rmsnorm.RMSNorm(16, elementwise_affine=False, bias=True), ValueError, "bias"),
]


@pytest.mark.parametrize("call,exc,name", BAD)
def test_bad_input_is_a_clear_early_error(call, exc, name):
    with pytest.raises(exc, match=name):
        call(rand(3, 16), rand(16))


def test_named_backend_never_falls_back():
    x = rand(3, 16, dtype=torch.float64)
    if any(b.name == "cpu" and b.available for b in rmsnorm.backends()):
        with pytest.raises(ValueError, match="backend='cpu' cannot handle"):
            rmsnorm.rms_norm(x, backend="cpu")  # fp64 is reference-only
    triton_info = next(b for b in rmsnorm.backends() if b.name == "triton")
    if "cpu" not in triton_info.devices or not triton_info.available:
        with pytest.raises((ValueError, RuntimeError), match="triton"):
            rmsnorm.rms_norm(rand(3, 16), backend="triton")  # CPU tensor (and maybe no triton at all)
    with pytest.raises(ValueError, match="cannot handle"):
        rmsnorm.rms_norm(rand(3, 16).to("meta"), backend="cpu")


def test_backends_listing():
    infos = rmsnorm.backends()
    names = [b.name for b in infos]
    assert {"reference", "cpu", "triton"} <= set(names)
    for b in infos:
        assert isinstance(b.available, bool)
        assert b.available == (b.reason == ""), b
    assert next(b for b in infos if b.name == "reference").available


def test_automatic_choice_and_default_setting():
    x = rand(4, 32)
    best = registry.select(None, x, None, plain(x.dtype))
    cpu_ok = any(b.name == "cpu" and b.available for b in rmsnorm.backends())
    assert best.name == ("cpu" if cpu_ok else "reference")
    assert registry.select(None, x.double(), None, plain(torch.float64)).name == "reference"
    try:
        registry.set_default("reference")
        assert registry.select(None, x, None, plain(x.dtype)).name == "reference"
        with pytest.raises(ValueError, match="backend"):
            registry.set_default("nope")
    finally:
        registry.set_default(None)


def _run(code: str, **env):
    e = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=600)


def test_env_var_sets_default():
    code = ("import torch, rmsnorm; from rmsnorm.backends import registry; from rmsnorm.spec import plain;"
            "print(registry.select(None, torch.randn(2, 8), None, plain(torch.float32)).name)")
    out = _run(code, RMSNORM_BACKEND="reference")
    assert out.stdout.strip() == "reference", out.stderr
    bad = _run("import torch, rmsnorm; rmsnorm.rms_norm(torch.randn(2, 8).double())", RMSNORM_BACKEND="cpu")
    assert bad.returncode != 0 and "RMSNORM_BACKEND='cpu'" in bad.stderr


def test_functional_accepts_multi_dim_and_strides():
    x = rand(6, 10, 8)[:, ::2]  # non-contiguous rows
    w = rand(8)
    assert max_err(rmsnorm.rms_norm(x, w), math64(x, w)) < 1e-5
    xt = rand(6, 8).t()  # last dim not contiguous
    assert max_err(rmsnorm.rms_norm(xt, rand(6, seed=3)), math64(xt, rand(6, seed=3))) < 1e-5


def test_empty_batch():
    for be in ["reference", None]:
        x = rand(0, 16).requires_grad_(True)
        w = rand(16).requires_grad_(True)
        y = rmsnorm.rms_norm(x, w, backend=be)
        assert y.shape == (0, 16)
        y.sum().backward()
        assert torch.equal(w.grad, torch.zeros(16))


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "rmsnorm", "info"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for s in ["rmsnorm", "torch", "threads", "allocator", "reference", "cpu", "triton"]:
        assert s in out.stdout
