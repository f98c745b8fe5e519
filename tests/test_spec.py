"""The call spec: one immutable object from the arguments to the kernels."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rmsnorm
from rmsnorm.functional import resolve
from rmsnorm.spec import Cast, Spec, decode, plain

from helpers import rand

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@given(nd=st.integers(1, 4), k=st.integers(0, 1 << 40), eps=st.floats(0, 1e3, allow_nan=False),
       outside=st.booleans(), offset=st.floats(-1e9, 1e9, allow_nan=False),
       round_to=st.sampled_from([None, torch.bfloat16, torch.float16]), out=st.sampled_from(DTYPES),
       residual=st.booleans())
def test_encode_decode_round_trip(nd, k, eps, outside, offset, round_to, out, residual):
    spec = Spec(nd, k, eps, outside, offset, round_to, out, residual)
    assert decode(spec.encode()) == spec


@pytest.mark.parametrize("text", ["", "nd=1", "nd=1;k=2;eps=x;eps_outside=0;offset=0.0;round_to=none;out=float32;"
                                  "residual=0", "nd=1;k=2;eps=0.1;eps_outside=0;offset=0.0;round_to=none;out=Tensor;"
                                  "residual=0"])
def test_decode_refuses_what_encode_did_not_write(text):
    with pytest.raises(ValueError, match="not an rmsnorm spec"):
        decode(text)


def test_resolve_gives_the_documented_spec():
    x, w = rand(3, 10, dtype=torch.bfloat16), rand(10)
    spec = resolve(x, w, None, rand(3, 10), None, None, "outside", 0.25, "floor", 1.0, "llama", None)
    assert spec == Spec(1, 2, torch.finfo(torch.float32).eps, True, 1.0, None, torch.float32, True)
    spec = resolve(x, w.bfloat16(), None, None, (10,), 1e-5, "inside", 1.0, "ceil", 0.0, Cast.LLAMA, None)
    assert spec.round_to == torch.bfloat16 and spec.out_dtype == torch.bfloat16 and not spec.residual
    assert resolve(x.float(), w.half(), None, None, None, 1e-5, "inside", 1.0, "ceil", 0.0, "t5", None).round_to \
        == torch.float16


def test_rstd_cast_rounds_the_inverse_rms_to_h_dtype_only_for_half_inputs():
    w = rand(10)
    for dt, rounded in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, None)):
        spec = resolve(rand(3, 10, dtype=dt), w.to(dt), None, None, None, 1e-6, "inside", 1.0, "ceil", 0.0, "rstd",
                       None)
        assert spec.rstd_round == rounded and spec.round_to == rounded and spec.out_dtype == dt
        assert decode(spec.encode()) == spec
    x = rand(3, 10, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cast='rstd' is not supported with a gate"):
        rmsnorm.rms_norm(x, w.bfloat16(), cast="rstd", gate=x)


def test_cast_members_are_their_strings():
    assert [c.value for c in Cast] == ["fp32", "llama", "t5", "rstd"]
    assert Cast.LLAMA == "llama" and Cast("t5") is Cast.T5
    m = rmsnorm.RMSNorm(8, cast="llama")
    assert m.cast is Cast.LLAMA and "cast='llama'" in repr(m)
    x, w = rand(2, 8, dtype=torch.bfloat16), rand(8, dtype=torch.bfloat16)
    assert torch.equal(rmsnorm.rms_norm(x, w, cast=Cast.LLAMA), rmsnorm.rms_norm(x, w, cast="llama"))
    with pytest.raises(ValueError, match="cast must be one of"):
        rmsnorm.rms_norm(x, w, cast="bf16")


def test_module_caches_one_spec_per_dtypes():
    m = rmsnorm.RMSNorm(8, p=0.5).requires_grad_(False)
    m(rand(2, 8))
    (spec, *_), = m.__dict__["_resolved"].values()
    assert isinstance(spec, Spec) and spec.k == 4
    m.p = 0.25  # an option change drops the cache
    m(rand(2, 8))
    (spec, *_), = m.__dict__["_resolved"].values()
    assert spec.k == 2


def test_a_backend_says_why_it_cannot_run_a_spec():
    from rmsnorm.backends import registry

    cpu = registry.get("cpu")
    assert cpu.unsupported_reason(rand(2, 8), None, plain(torch.float32)) is None
    assert "out_dtype" in cpu.unsupported_reason(rand(2, 8), None, plain(torch.float64))
    with pytest.raises(ValueError, match="cannot handle this input: out_dtype"):
        rmsnorm.rms_norm(rand(2, 8), out_dtype=torch.float64, backend="cpu")
