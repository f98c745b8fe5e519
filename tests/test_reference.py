"""The reference backend against float64 math, torch, and the authors' own formulas; its hand-written backward."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import rmsnorm

from helpers import authors_pytorch, authors_tf, grads, k_of, math64, max_err, rand

REF = {"backend": "reference"}
MODES = list(itertools.product(["inside", "outside"], [1.0, 0.0625, 0.5], [False, True], [False, True],
                               [0.0, 1.0]))


@pytest.mark.parametrize("n", [1, 2, 7, 127, 4099, 65537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_math(n, dtype, poison):
    m = 3 if n < 65537 else 2
    x, w = rand(m, n, dtype=dtype), rand(n, dtype=dtype)
    for eps_mode, p in [("inside", 1.0), ("outside", 0.0625)]:
        y = rmsnorm.rms_norm(x, w, eps_mode=eps_mode, p=p, **REF)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert max_err(y, math64(x, w, eps_mode=eps_mode, p=p)) <= tol * (1 + math64(x, w).abs().max().item())


@pytest.mark.parametrize("eps_mode,p,bias,res,offset", MODES)
def test_forward_flags_match_math(eps_mode, p, bias, res, offset, poison):
    x, w = rand(5, 3, 40, dtype=torch.float64), rand(40, dtype=torch.float64)
    b = rand(40, dtype=torch.float64) if bias else None
    r = rand(5, 3, 40, dtype=torch.float64) if res else None
    out = rmsnorm.rms_norm(x, w, b, eps_mode=eps_mode, p=p, offset=offset, residual=r, **REF)
    y = out[0] if res else out
    truth = math64(x, w, b, eps_mode=eps_mode, p=p, offset=offset, residual=r)
    assert max_err(y, truth) < 1e-12
    if res:
        assert max_err(out[1], x + r) == 0.0


def test_multi_dim_normalized_shape():
    x, w = rand(4, 6, 5, dtype=torch.float64), rand(6, 5, dtype=torch.float64)
    y = rmsnorm.rms_norm(x, w, p=0.3, **REF)
    assert max_err(y, math64(x, w, p=0.3, nd=2)) < 1e-12
    y2 = rmsnorm.rms_norm(x, normalized_shape=(6, 5), **REF)
    assert max_err(y2, math64(x, nd=2)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_rms_norm(dtype):
    x, w = rand(33, 257, dtype=dtype, scale=3.0), rand(257, dtype=dtype)
    ours = rmsnorm.rms_norm(x, w, eps=1e-5, **REF)
    theirs = F.rms_norm(x, (257,), w, eps=1e-5)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-6 if dtype == torch.float32 else 0, atol=1e-6 if
                               dtype == torch.float32 else 0)
    # eps=None: torch's default, also through the module; a torch state_dict loads
    ref_mod = torch.nn.RMSNorm(257, dtype=dtype)
    with torch.no_grad():
        ref_mod.weight.copy_(w)
    mod = rmsnorm.RMSNorm(257, dtype=dtype)
    mod.load_state_dict(ref_mod.state_dict())
    torch.testing.assert_close(mod(x), ref_mod(x), rtol=1e-6, atol=1e-6)


def test_mixed_dtype_gain_matches_torch():
    x, w = rand(16, 300, dtype=torch.bfloat16), rand(300, dtype=torch.float32)
    with pytest.warns(UserWarning, match="Mismatch dtype"):
        theirs = F.rms_norm(x, (300,), w, eps=1e-6)
    ours = rmsnorm.rms_norm(x, w, **REF)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("p", [-1.0, 0.0625, 0.3, 1.0])
def test_authors_pytorch_formula(p):
    x, w = rand(7, 96, dtype=torch.float64), rand(96, dtype=torch.float64)
    theirs = authors_pytorch(x, w, eps=1e-8, p=p)
    ours = rmsnorm.rms_norm(x, w, eps=1e-8, eps_mode="outside", p=1.0 if p < 0 else p,
                            partial_rounding="floor", **REF)
    assert max_err(ours, theirs) < 1e-12
    # its gradient too (torch autograd through their forward)
    _, g_theirs = grads(lambda a, b: authors_pytorch(a, b, eps=1e-8, p=p), x, w)
    _, g_ours = grads(lambda a, b: rmsnorm.rms_norm(a, b, eps=1e-8, eps_mode="outside", p=1.0 if p < 0 else p,
                                                    partial_rounding="floor", **REF), x, w)
    for a, b in zip(g_ours, g_theirs):
        assert max_err(a, b) < 1e-10


def test_authors_tf_formula():
    x, w, b = rand(7, 96, dtype=torch.float64), rand(96, dtype=torch.float64), rand(96, dtype=torch.float64)
    assert max_err(rmsnorm.rms_norm(x, w, b, eps=1e-8, **REF), authors_tf(x, w, b, eps=1e-8)) < 1e-12


def test_partial_rounding():
    from rmsnorm.args import partial_size

    assert partial_size(100, 0.07, "ceil") == 7 == partial_size(100, 0.07, "floor")
    assert partial_size(10, 0.25, "ceil") == 3 and partial_size(10, 0.25, "floor") == 2
    assert partial_size(10, 0.01, "floor") == 1  # k >= 1 always
    assert partial_size(4096, 0.0625) == 256 and partial_size(7, 1.0) == 7
    for n, p in itertools.product([1, 3, 10, 33, 4096], [0.01, 0.0625, 0.5, 0.99]):
        assert partial_size(n, p, "ceil") == k_of(n, p, "ceil")
        assert partial_size(n, p, "floor") == k_of(n, p, "floor")


@pytest.mark.parametrize("eps_mode,p,bias,res,offset", MODES)
def test_hand_backward_matches_autograd(eps_mode, p, bias, res, offset):
    x, w = rand(6, 37, dtype=torch.float64), rand(37, dtype=torch.float64)
    b = rand(37, dtype=torch.float64) if bias else None
    r = rand(6, 37, dtype=torch.float64) if res else None
    kw = {"eps_mode": eps_mode, "p": p, "offset": offset}
    _out, g_ours = grads(lambda *t: rmsnorm.rms_norm(*t[:3], residual=t[3], **kw, **REF), x, w, b, r)
    _out2, g_math = grads(lambda *t: (math64(*t[:3], residual=t[3], **kw), t[0] + t[3]) if res
                         else math64(*t[:3], residual=None, **kw), x, w, b, r)
    for name, a, e in zip(["x", "weight", "bias", "residual"], g_ours, g_math):
        if e is None:
            assert a is None
        else:
            assert max_err(a, e) < 1e-10, name


@pytest.mark.parametrize("eps_mode,p,bias,res,offset", MODES[::3])
def test_gradcheck(eps_mode, p, bias, res, offset):
    x, w = rand(3, 11, dtype=torch.float64), rand(11, dtype=torch.float64)
    b = rand(11, dtype=torch.float64) if bias else None
    r = rand(3, 11, dtype=torch.float64) if res else None
    ts = [t.requires_grad_(True) for t in (x, w, b, r) if t is not None]

    def fn(*args):
        it = iter(args)
        xx, ww = next(it), next(it)
        bb = next(it) if bias else None
        rr = next(it) if res else None
        return rmsnorm.rms_norm(xx, ww, bb, eps_mode=eps_mode, p=p, offset=offset, residual=rr, **REF)

    assert torch.autograd.gradcheck(fn, ts)


def test_zero_row_gives_zeros_not_nan():
    x = rand(3, 16, dtype=torch.float32)
    x[1] = 0
    for mode in ["inside", "outside"]:
        for be in [b.name for b in rmsnorm.backends() if b.available and "cpu" in (*b.devices, "*")]:
            y = rmsnorm.rms_norm(x, rand(16), eps=1e-6, eps_mode=mode, backend=be)
            assert not y.isnan().any() and (y[1] == 0).all()
            _, (gx, gw) = grads(lambda a, w, m=mode, b=be: rmsnorm.rms_norm(a, w, eps_mode=m, backend=b), x,
                                rand(16))
            assert not gx.isnan().any() and not gw.isnan().any()


def test_llama_cast_matches_hf_formula():
    x, w = rand(9, 64, dtype=torch.bfloat16, scale=4), rand(64, dtype=torch.bfloat16)
    hs = x.float()
    hf = w * (hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    ours = rmsnorm.rms_norm(x, w, cast="llama", **REF)
    assert ours.dtype == hf.dtype
    assert torch.equal(ours, hf)
    # fp32 gain with bf16 activations: HF returns fp32
    w32 = w.float()
    hf32 = w32 * (hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    ours32 = rmsnorm.rms_norm(x, w32, cast="llama", **REF)
    assert ours32.dtype == torch.float32 and torch.equal(ours32, hf32)


def _t5_formula(x, w, eps=1e-6):
    """transformers' T5LayerNorm.forward."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden = x * torch.rsqrt(variance + eps)
    if w.dtype in (torch.float16, torch.bfloat16):
        hidden = hidden.to(w.dtype)
    return w * hidden


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float16)])
def test_t5_cast_matches_hf_formula_for_every_dtype_pair(x_dtype, w_dtype):
    x, w = rand(9, 64, dtype=x_dtype, scale=4), rand(64, dtype=w_dtype)
    expect = _t5_formula(x, w)
    for cast in ("t5", rmsnorm.Cast.T5):
        ours = rmsnorm.rms_norm(x, w, cast=cast, **REF)
        assert ours.dtype == expect.dtype and torch.equal(ours, expect)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
def test_rstd_cast_is_the_same_in_the_reference_and_the_decomposition(dtype, eps_mode):
    """cast="rstd" (1/RMS rounded to h's dtype first): the reference backend and the decomposition that
    compile and export trace give the same bits, and its gradient treats the rounding as identity."""
    from rmsnorm import composite, reference
    from rmsnorm.functional import resolve

    x, w = rand(6, 40, dtype=dtype, scale=3.0, seed=5), rand(40, dtype=dtype, seed=6)
    spec = resolve(x, w, None, None, None, 1e-6, eps_mode, 1.0, "ceil", 0.0, "rstd", None)
    y_ref = reference.forward(x, w, None, None, spec)[0]
    if dtype == torch.float32:  # no rounding in fp32 (and eps outside divides there: 1 ulp apart)
        assert spec.rstd_round is None
        torch.testing.assert_close(composite.normalize(x, w, None, spec), y_ref, rtol=2e-7, atol=1e-7)
    else:
        assert torch.equal(composite.normalize(x, w, None, spec), y_ref)
    if dtype == torch.bfloat16 and eps_mode == "inside":  # the Hugging Face form, bit for bit
        want = w * (x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-6).to(dtype))
        assert torch.equal(y_ref, want)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: rmsnorm.rms_norm(a, b, eps=1e-6, eps_mode=eps_mode, cast="rstd"),
                                    (x64, w64))
