"""The cpu backend's eager entry (one C++ call per norm): bitwise the Python path's results, and every call it
must not serve goes back to that path (errors, transforms, tracing, modes, other backends, subclasses)."""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import rmsnorm
from rmsnorm import functional

from helpers import default_backend, math64

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _entry_answers(m: rmsnorm.RMSNorm, x: torch.Tensor):
    """What the module's entry returns for x (None: it declines)."""
    fast = m.__dict__.get("_entry")
    assert fast, "the module made no entry"
    return fast[0](fast[1], x, m.weight, m.bias)


def _python_path(m: rmsnorm.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # normalized_shape given: the functional API's checked path (the entry serves only keyword options)
    return rmsnorm.rms_norm(x, m.weight, m.bias, eps=m.eps, eps_mode=m.eps_mode, p=m.p,
                            partial_rounding=m.partial_rounding, offset=m.offset, cast=m.cast,
                            out_dtype=m.out_dtype, normalized_shape=m.normalized_shape, backend="cpu")


CASES = list(itertools.product(
    [torch.float32, torch.bfloat16, torch.float16],  # x
    [None, torch.float32, torch.bfloat16],  # weight dtype (None: x's)
    ["fp32", "llama", "t5", "rstd"],
    [(1.0, "ceil", "inside", 0.0, False), (0.3, "floor", "outside", 1.0, True), (0.5, "ceil", "inside", 0.0, True)],
))


@pytest.mark.parametrize("xd,wd,cast,opts", CASES)
def test_outputs_and_gradients_are_the_python_paths_bit_for_bit(xd, wd, cast, opts):
    p, rounding, eps_mode, offset, bias = opts
    g = torch.Generator().manual_seed(7)
    m = rmsnorm.RMSNorm(37, eps=None if bias else 1e-5, p=p, partial_rounding=rounding, eps_mode=eps_mode,
                        offset=offset, cast=cast, bias=bias, dtype=wd or xd)
    with torch.no_grad():
        m.weight.copy_(torch.randn(37, generator=g))
        if m.bias is not None:
            m.bias.copy_(torch.randn(37, generator=g))
    x = (torch.randn(5, 3, 37, generator=g) * 3).to(xd)
    m(x)  # the first call makes the entry
    with torch.no_grad():
        y = _entry_answers(m, x)
        assert y is not None
        assert torch.equal(y, _python_path(m, x)) and y.dtype == _python_path(m, x).dtype
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya = m(xa)
    dy = torch.randn(ya.shape, generator=g).to(ya.dtype)
    ga = torch.autograd.grad(ya, (xa, *[t for t in (m.weight, m.bias) if t is not None]), dy)
    yb = _python_path(m, xb)
    gb = torch.autograd.grad(yb, (xb, *[t for t in (m.weight, m.bias) if t is not None]), dy)
    assert torch.equal(ya, yb)
    for a, b in zip(ga, gb, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1, 4096), (8, 4096), (64, 480), (64, 512), (0, 16), (3, 1), (2, 3, 5)])
def test_functional_entry_matches_torch(shape):
    x = torch.randn(shape)
    w = torch.randn(shape[-1])
    for _ in range(2):  # the second call runs on the entry
        y = rmsnorm.rms_norm(x, w, eps=1e-6)
        torch.testing.assert_close(y, F.rms_norm(x, shape[-1:], w, 1e-6), rtol=1e-6, atol=1e-6)
    assert any(v for v in functional._ENTRIES.values())


def test_errors_still_come_from_the_checked_path():
    m = rmsnorm.RMSNorm(8)
    m(torch.randn(2, 8))
    with pytest.raises(ValueError, match="does not end with the normalized shape"):
        m(torch.randn(2, 9))
    with pytest.raises(TypeError, match="floating dtype"):
        m(torch.ones(2, 8, dtype=torch.int64))
    rmsnorm.rms_norm(torch.randn(2, 8), torch.ones(8), eps=1)
    with pytest.raises(TypeError, match="eps must be a float"):
        rmsnorm.rms_norm(torch.randn(2, 8), torch.ones(8), eps=True)
    with pytest.raises(TypeError, match="eps must be a float"):
        rmsnorm.rms_norm(torch.randn(2, 8), torch.ones(8), eps=[1e-6])  # unhashable: no entry lookup error
    with pytest.raises(ValueError, match="offset applies to the gain"):
        rmsnorm.rms_norm(torch.randn(2, 8), None, offset=1.0)


def test_declines_what_it_does_not_serve():
    m = rmsnorm.RMSNorm(8)
    x = torch.randn(3, 8)
    m(x)
    assert _entry_answers(m, x) is not None
    assert _entry_answers(m, x.double()) is None  # the cpu backend has no fp64 kernel
    class Sub(torch.Tensor):
        pass

    assert _entry_answers(m, x.as_subclass(Sub)) is None  # a subclass keeps its own semantics
    assert _entry_answers(m, torch._neg_view(x)) is None
    assert _entry_answers(m, torch.randn(3, 9)) is None
    with torch.inference_mode():
        xi = torch.randn(3, 8)
    assert _entry_answers(m, xi) is None  # inference tensor with a gain that requires grad
    with torch.no_grad():
        assert _entry_answers(m, xi) is not None


def test_negative_views_are_read_as_their_values():
    x = torch.randn(4, 16)
    w = torch.randn(16)
    want = math64(-x, w).float()
    for backend in ("cpu", "reference"):
        torch.testing.assert_close(rmsnorm.rms_norm(torch._neg_view(x), w, backend=backend), want)
        torch.testing.assert_close(rmsnorm.rms_norm(-x, torch._neg_view(-w), backend=backend), want)
    m = rmsnorm.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        m.weight.copy_(w)
    for _ in range(2):
        torch.testing.assert_close(m(torch._neg_view(x)), want)


def test_another_default_backend_turns_the_entry_off():
    m = rmsnorm.RMSNorm(8)
    x = torch.randn(3, 8)
    m(x)
    with default_backend("reference"):
        assert _entry_answers(m, x) is None
        torch.testing.assert_close(m(x), math64(x, m.weight, eps=torch.finfo(torch.float32).eps).float())
    assert _entry_answers(m, x) is not None
    named = rmsnorm.RMSNorm(8, backend="reference")
    named(x)
    assert named.__dict__.get("_entry") == (None, None, "cpu")  # no entry for CPU tensors


def test_option_changes_and_parametrize_reach_the_call():
    m = rmsnorm.RMSNorm(8, eps=1e-6)
    x = torch.randn(3, 8) * 1e-3
    m(x)
    m.eps = 1.0
    torch.testing.assert_close(m(x), math64(x, m.weight, eps=1.0).float())

    class Scale(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(m, "weight", Scale())
    torch.testing.assert_close(m(x), math64(x, 2 * m.parametrizations.weight.original, eps=1.0).float())


def test_transforms_tracing_and_modes_take_their_routes():
    m = rmsnorm.RMSNorm(8, eps=1e-6)
    x = torch.randn(3, 8)
    m(x)
    want = math64(x, m.weight).float()
    torch.testing.assert_close(torch.func.vmap(m)(x), want)
    gx = torch.func.grad(lambda t: m(t).sum())(x)
    x64 = x.double().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(math64(x64, m.weight.detach()).sum(), x64)
    torch.testing.assert_close(gx, gx_ref.float(), rtol=1e-5, atol=1e-5)
    traced = torch.jit.trace(m, x, check_trace=False)  # traced from plain ops, so it generalises
    torch.testing.assert_close(traced(x * 2), math64(x * 2, m.weight).float())

    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        torch.testing.assert_close(m(x), want)
    assert seen  # the mode saw the call's ops (the entry stepped aside)


def test_copies_and_pickles_leave_the_caches_behind():
    m = rmsnorm.RMSNorm(8)
    x = torch.randn(3, 8)
    m(x)
    assert m.__dict__.get("_entry")
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert "_entry" not in other.__dict__
        torch.testing.assert_close(other(x), m(x))


@pytest.mark.parametrize("grad", [True, False])
def test_forward_mode_ad_carries_tangents(grad):
    import torch.autograd.forward_ad as fwAD

    m, tm = rmsnorm.RMSNorm(8, eps=1e-6), torch.nn.RMSNorm(8, eps=1e-6)
    x, t = torch.randn(3, 8), torch.randn(3, 8)
    m(x)  # the entry exists
    with torch.set_grad_enabled(grad), fwAD.dual_level():
        d = fwAD.make_dual(x, t)
        want = fwAD.unpack_dual(tm(d)).tangent
        for got in (m(d), rmsnorm.rms_norm(d, m.weight, eps=1e-6)):
            torch.testing.assert_close(fwAD.unpack_dual(got).tangent, want)


@pytest.mark.parametrize("xd,rd", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                   (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("cast", ["fp32", "llama"])
def test_residual_calls_are_the_python_paths_bit_for_bit(xd, rd, cast):
    g = torch.Generator().manual_seed(3)
    m = rmsnorm.RMSNorm(40, eps=1e-6, cast=cast, dtype=xd)
    with torch.no_grad():
        m.weight.copy_(torch.randn(40, generator=g))
    x, r = torch.randn(6, 40, generator=g).to(xd), torch.randn(6, 40, generator=g).to(rd)
    m(x, r)  # makes the entry
    fast = m.__dict__["_entry"]
    with torch.no_grad():
        y, h = fast[0](fast[1], x, m.weight, None, r)
        y0, h0 = rmsnorm.rms_norm(x, m.weight, eps=1e-6, cast=cast, residual=r, normalized_shape=40)
        assert torch.equal(y, y0) and torch.equal(h, h0) and y.dtype == y0.dtype and h.dtype == rd
    leaves = [t.clone().requires_grad_(True) for t in (x, r)]
    y1, h1 = m(*leaves)
    dy, dh = torch.randn(y1.shape, generator=g).to(y1.dtype), torch.randn(h1.shape, generator=g).to(h1.dtype)
    ga = torch.autograd.grad((y1, h1), (*leaves, m.weight), (dy, dh))
    leaves2 = [t.clone().requires_grad_(True) for t in (x, r)]
    y2, h2 = rmsnorm.rms_norm(leaves2[0], m.weight, eps=1e-6, cast=cast, residual=leaves2[1], normalized_shape=40)
    gb = torch.autograd.grad((y2, h2), (*leaves2, m.weight), (dy, dh))
    assert torch.equal(y1, y2) and torch.equal(h1, h2)
    for a, b in zip(ga, gb, strict=True):
        assert torch.equal(a, b)
    y3, h3 = rmsnorm.rms_norm(x, m.weight, eps=1e-6, cast=cast, residual=r)
    y3, h3 = rmsnorm.rms_norm(x, m.weight, eps=1e-6, cast=cast, residual=r)  # the functional's entry
    assert torch.equal(y3, y0) and torch.equal(h3, h0)
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        m(x, r[:3])


def test_a_module_pickled_before_the_gate_options_loads_and_runs():
    m = rmsnorm.RMSNorm(8)
    for name in ("group_size", "gate_mode", "gate_act"):  # what an older rmsnorm pickled
        del m.__dict__[name]
    loaded = pickle.loads(pickle.dumps(m))
    x = torch.randn(2, 8)
    torch.testing.assert_close(loaded(x), rmsnorm.RMSNorm(8)(x))
    assert loaded.group_size is None and loaded.gate_mode == "after" and loaded.gate_act == "silu"
