"""The paper's Table 1 as property tests (hypothesis), on every available CPU backend.

RMSNorm / pRMSNorm are invariant to weight-matrix re-scaling, dataset re-scaling and single-case
re-scaling; not to weight-matrix re-centering, dataset re-centering or weight-vector re-scaling; and equal
LayerNorm on zero-mean inputs. eps=0 makes the invariances exact up to round-off.
"""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import rmsnorm

from helpers import available

BACKENDS = [b for b in ("reference", "cpu") if available(b)]
P = st.sampled_from([1.0, 0.5, 0.0625])
SEED = st.integers(0, 2**31 - 1)
SCALE = st.floats(1e-2, 1e2)
DIMS = st.tuples(st.integers(1, 6), st.integers(2, 80), st.integers(2, 40))


def layer(seed, m, n, d, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=dtype)
    w = torch.randn(n, d, generator=g, dtype=dtype)
    gain = torch.rand(n, generator=g, dtype=dtype) + 0.5
    bias = torch.randn(n, generator=g, dtype=dtype)
    return x, w, gain, bias


def norm(a, gain, bias, p, backend):
    dtype = torch.float32 if backend == "cpu" else torch.float64
    out = rmsnorm.rms_norm(a.to(dtype), gain.to(dtype), bias.to(dtype), eps=0.0, p=p, backend=backend)
    return out.double()


def tol(backend):
    return {"rtol": 1e-4, "atol": 1e-4} if backend == "cpu" else {"rtol": 1e-9, "atol": 1e-9}


@pytest.mark.parametrize("backend", BACKENDS)
@given(dims=DIMS, seed=SEED, delta=SCALE, p=P)
def test_weight_matrix_rescaling_invariance(backend, dims, seed, delta, p):
    m, n, d = dims
    x, w, g, b = layer(seed, m, n, d)
    torch.testing.assert_close(norm(x @ (delta * w).T, g, b, p, backend), norm(x @ w.T, g, b, p, backend),
                               **tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@given(dims=DIMS, seed=SEED, delta=SCALE, p=P)
def test_dataset_rescaling_invariance(backend, dims, seed, delta, p):
    m, n, d = dims
    x, w, g, b = layer(seed, m, n, d)
    torch.testing.assert_close(norm((delta * x) @ w.T, g, b, p, backend), norm(x @ w.T, g, b, p, backend),
                               **tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@given(dims=DIMS, seed=SEED, p=P)
def test_single_case_rescaling_invariance(backend, dims, seed, p):
    m, n, d = dims
    x, w, g, b = layer(seed, m, n, d)
    scales = torch.rand(m, 1, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) * 50 + 0.02
    torch.testing.assert_close(norm((scales * x) @ w.T, g, b, p, backend), norm(x @ w.T, g, b, p, backend),
                               **tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@given(dims=DIMS, seed=SEED, shift=st.floats(0.5, 5.0), p=P)
def test_not_invariant_to_recentering(backend, dims, seed, shift, p):
    m, n, d = dims
    x, w, g, b = layer(seed, m, n, d)
    a = x @ w.T
    # dataset re-centering (shift every summed input) and weight-matrix re-centering (W + 1 gamma^T)
    gamma = torch.randn(d, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    for shifted in (a + shift, x @ (w + shift * gamma[None, :]).T):
        assert not torch.allclose(norm(shifted, g, b, p, backend), norm(a, g, b, p, backend), rtol=1e-3,
                                  atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@given(dims=DIMS, seed=SEED, p=P)
def test_not_invariant_to_weight_vector_rescaling(backend, dims, seed, p):
    m, n, d = dims
    x, w, g, b = layer(seed, m, n, d)
    w2 = w.clone()
    w2[0] *= 3.0  # one row of W (one summed input) re-scaled
    assert not torch.allclose(norm(x @ w2.T, g, b, p, backend), norm(x @ w.T, g, b, p, backend), rtol=1e-3,
                              atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@given(dims=DIMS, seed=SEED)
def test_equals_layernorm_on_zero_mean_inputs(backend, dims, seed):
    m, n, d = dims
    x, w, g, b = layer(seed, m, n, d)
    a = x @ w.T
    a = a - a.mean(-1, keepdim=True)
    ln = torch.nn.functional.layer_norm(a, (n,), g, b, eps=0.0)
    torch.testing.assert_close(norm(a, g, b, 1.0, backend), ln, **tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@given(dims=DIMS, seed=SEED, delta=SCALE, p=P)
def test_gain_gradient_invariant_to_input_scaling(backend, dims, seed, delta, p):
    m, n, d = dims
    x, w, g, _b = layer(seed, m, n, d)
    dtype = torch.float32 if backend == "cpu" else torch.float64

    def grad_g(inp):
        gg = g.to(dtype).clone().requires_grad_(True)
        y = rmsnorm.rms_norm((inp @ w.T).to(dtype), gg, eps=0.0, p=p, backend=backend)
        y.backward(torch.ones_like(y))
        return gg.grad.double()

    torch.testing.assert_close(grad_g(delta * x), grad_g(x), **tol(backend))
