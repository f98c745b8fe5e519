"""The fused CPU kernels against the reference: every flag combination, dtypes, shapes, strides, determinism."""

import os
import subprocess
import sys

import pytest
import torch

import rmsnorm

from helpers import available, check_against_reference, max_err, rand, run_with_grads

pytestmark = pytest.mark.skipif(not available("cpu"), reason="cpu backend unavailable (no compiler?)")


@pytest.mark.parametrize("n", [1, 2, 7, 31, 32, 33, 127, 4099, 65537, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes(n, dtype, poison):
    m = 3 if n <= 65537 else 2
    x, w = rand(m, n, dtype=dtype, seed=n), rand(n, dtype=dtype, seed=n + 1)
    check_against_reference(x, w, None, None, what=f"n={n}", p=0.0625)
    r = rand(m, n, dtype=dtype, seed=n + 2)
    check_against_reference(x, w, rand(n, dtype=dtype), r, what=f"n={n} res", eps_mode="outside")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [37, 64, 300])
def test_streaming_and_blocked_paths(dtype, n, monkeypatch, poison):
    """Force the multi-block and non-temporal-store paths on small shapes (aligned and unaligned rows)."""
    from rmsnorm import functional
    from rmsnorm.backends.cpu import heuristics

    monkeypatch.setattr(heuristics, "LAUNCH", heuristics.CpuLaunch(parallel_min_elements=0, stream_min_bytes=0))
    monkeypatch.setattr(functional, "_ENTRIES", {})  # entries take the launch thresholds when they are made
    x, w = rand(9, n, dtype=dtype, seed=n), rand(n, dtype=dtype, seed=n + 1)
    check_against_reference(x, w, rand(n, dtype=dtype), rand(9, n, dtype=dtype), p=0.3)
    check_against_reference(x, w, None, None, cast="llama", eps_mode="outside")


def test_many_rows_multi_threaded(poison):
    x, w = rand(1031, 96, seed=1), rand(96, seed=2)
    check_against_reference(x, w, rand(96, seed=3), rand(1031, 96, seed=4), p=0.25)


def test_empty_and_single_row():
    for m in (0, 1):
        x, w = rand(m, 40), rand(40)
        check_against_reference(x, w, rand(40), rand(m, 40), what=f"m={m}")


def test_multi_dim_normalized_shape():
    x, w = rand(4, 3, 6, 5), rand(6, 5)
    check_against_reference(x, w, None, None, p=0.3)


def test_strided_rows_without_copy(monkeypatch):
    base = rand(8, 300, dtype=torch.bfloat16)
    x = base[:, 10:138]  # row stride 300, last dim contiguous
    w = rand(128, dtype=torch.bfloat16)
    assert not x.is_contiguous()
    copies = []
    orig = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: copies.append(1) or orig(self, *a, **k))
    y = rmsnorm.rms_norm(x, w, backend="cpu")
    assert not copies
    torch.testing.assert_close(y, rmsnorm.rms_norm(x.contiguous(), w, backend="reference"), rtol=0, atol=0)
    check_against_reference(x, w, None, rand(8, 300, dtype=torch.bfloat16)[:, :128])
    # strided dy into the backward kernel directly
    from rmsnorm.backends import get
    from rmsnorm.spec import Spec

    be, ref = get("cpu"), get("reference")
    spec = Spec(1, 64, 1e-6, False, 0.0, None, x.dtype, False)
    y, _h, rstd = be.forward(x, w, None, None, spec)
    dy = rand(8, 400, dtype=torch.bfloat16)[:, 7:135]
    a = be.backward(dy, None, x, w, None, rstd, spec, True, False)
    e = ref.backward(dy, None, x, w, None, rstd, spec, True, False)
    assert max_err(a[0], e[0]) <= 2e-2 and max_err(a[1], e[1]) <= 5e-2


def test_transposed_input_is_copied_correctly():
    x = rand(64, 8).t()  # (8, 64) with stride (1, 8): last dim not contiguous
    check_against_reference(x, rand(64), None, None)


def test_backward_is_deterministic():
    x, w, b = rand(4096, 256, seed=5), rand(256, seed=6), rand(256, seed=7)
    runs = [run_with_grads(x, w, b, None, "cpu", p=0.5)[1] for _ in range(3)]
    for other in runs[1:]:
        for a, e in zip(runs[0], other):
            if a is not None:
                assert torch.equal(a, e)


def test_thread_counts_agree():
    x, w = rand(512, 200, seed=8), rand(200, seed=9)
    before = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(run_with_grads(x, w, None, None, "cpu"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0])  # forward is row-wise: identical
    assert max_err(outs[0][1][1], outs[1][1][1]) < 1e-4  # dw: same sum, another order


@pytest.mark.slow
def test_int64_indexing_beyond_2_31_elements():
    n = 1 << 16
    m = (1 << 31) // n + 2  # M*N > 2^31
    try:
        x = torch.empty(m, n, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("not enough memory")
    x[-3:] = rand(3, n, dtype=torch.bfloat16, seed=11)
    w = rand(n, dtype=torch.bfloat16)
    y = rmsnorm.rms_norm(x[-3:], w, backend="cpu")  # small view at a > 2^31 element offset
    big = rmsnorm.rms_norm(x, w, backend="cpu")
    torch.testing.assert_close(big[-3:], y, rtol=0, atol=0)
    ref = rmsnorm.rms_norm(x[-3:].clone(), w, backend="reference")
    torch.testing.assert_close(y, ref, rtol=8e-3, atol=1e-2)  # 1 bf16 ulp: another summation order


def test_fallback_without_compiler(tmp_path):
    code = (
        "import warnings, torch, rmsnorm\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = rmsnorm.rms_norm(torch.randn(4, 8))\n"
        "    y = rmsnorm.rms_norm(torch.randn(4, 8))\n"
        "msgs = [str(m.message) for m in w if 'unavailable' in str(m.message)]\n"
        "print(len(msgs)); print(msgs[0][:80])\n"
        "print([b.available for b in rmsnorm.backends() if b.name == 'cpu'][0])\n"
    )
    env = {**os.environ, "CXX": "/nonexistent/c++", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "1", out.stdout  # exactly one warning
    assert "cpu backend is unavailable" in lines[1]
    assert lines[2] == "False"
    info = subprocess.run([sys.executable, "-m", "rmsnorm", "info"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert "cpu        unavailable" in info.stdout
