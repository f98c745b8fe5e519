"""One conformance suite for every fused backend that runs here (cpu; triton on CUDA, or on CPU tensors in
Triton's interpreter): the flag matrix against the reference, special values, zero rows. A new backend
gets these tests by registering itself; the path-specific tests stay in test_<backend>_backend.py."""

import itertools

import pytest
import torch

import rmsnorm

from helpers import available, check_against_reference, rand

CUDA = torch.cuda.is_available()
BACKENDS = [b for b in ("cpu", "triton") if available(b)]
# where each backend runs here, and the extra low-precision slack it needs (ulps): Triton's interpreter
# truncates bf16/fp16 casts instead of rounding them
TOLERANCE = {"cpu": ("cpu", 0.0), "triton": ("cuda", 0.0) if CUDA else ("cpu", 1.0)}
FLAGS = list(itertools.product(["inside", "outside"], [1.0, 0.0625, 0.4], [False, True], [0.0, 1.0],
                               ["fp32", "llama", "t5", "rstd"], [None, "same", "fp32"]))


def _device(backend: str) -> str:
    return TOLERANCE[backend][0]


# the interpreter is slow: it runs every third combination of the matrix
CASES = [(b, i) for b in BACKENDS for i in range(len(FLAGS)) if not (b == "triton" and not CUDA and i % 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend,i", CASES, ids=[f"{b}-{FLAGS[i]}" for b, i in CASES])
def test_flag_matrix(backend, i, dtype, poison):
    eps_mode, p, bias, offset, cast, res = FLAGS[i]
    dev = _device(backend)
    n = 37 if i % 2 else 70
    x = rand(5, n, dtype=dtype, scale=2.0, seed=i, device=dev)
    w = rand(n, dtype=torch.float32 if i % 3 == 0 else dtype, seed=i + 1, device=dev)  # gain of another dtype
    b = rand(n, dtype=dtype, seed=i + 2, device=dev) if bias else None
    r = None if res is None else rand(5, n, dtype=dtype if res == "same" else torch.float32, seed=i + 3,
                                      device=dev)
    kw = {"eps_mode": eps_mode, "p": p, "offset": offset, "cast": cast}
    if i % 4 == 1:
        kw["out_dtype"] = torch.float32
    check_against_reference(x, w, b, r, what=str(kw), backend=backend, low_atol_ulps=TOLERANCE[backend][1], **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
                                             (torch.bfloat16, torch.float16)])
def test_cast_rounds_to_a_gain_dtype_other_than_the_inputs(backend, x_dtype, w_dtype, poison):
    dev = _device(backend)
    x, w = rand(7, 45, dtype=x_dtype, scale=2.0, device=dev), rand(45, dtype=w_dtype, seed=3, device=dev)
    r = rand(7, 45, dtype=x_dtype, seed=4, device=dev)
    for res in (None, r):
        check_against_reference(x, w, None, res, what=f"t5 {x_dtype}/{w_dtype}", backend=backend,
                                low_atol_ulps=TOLERANCE[backend][1], cast="t5")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("eps_mode", ["inside", "outside"])
def test_zero_rows_give_zeros_and_finite_gradients(backend, eps_mode):
    dev = _device(backend) if backend != "reference" else "cpu"
    x = rand(4, 40, device=dev)
    x[1] = 0
    x = x.requires_grad_(True)
    w = rand(40, device=dev).requires_grad_(True)
    y = rmsnorm.rms_norm(x, w, backend=backend, eps_mode=eps_mode, p=0.5)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_special_values_stay_in_their_rows_as_in_the_reference(backend, value):
    dev = _device(backend)
    x = rand(6, 33, device=dev)
    x[2, 5] = value
    w = rand(33, device=dev)
    ours = rmsnorm.rms_norm(x, w, backend=backend)
    ref = rmsnorm.rms_norm(x, w, backend="reference")
    assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isinf(), ref.isinf())
    keep = torch.ones(6, dtype=torch.bool)
    keep[2] = False
    torch.testing.assert_close(ours[keep], ref[keep])
    assert torch.equal(ref[2].isnan(), torch.nn.functional.rms_norm(x, (33,), w, 1e-6)[2].isnan())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [0, 1, 3])
def test_no_rows(backend, m):
    dev = _device(backend)
    x = rand(m, 16, device=dev).requires_grad_(True)
    w = rand(16, device=dev).requires_grad_(True)
    y = rmsnorm.rms_norm(x, w, backend=backend)
    y.sum().backward()
    assert y.shape == (m, 16) and x.grad.shape == (m, 16) and w.grad.shape == (16,)
    if m == 0:
        assert torch.equal(w.grad, torch.zeros_like(w.grad))
