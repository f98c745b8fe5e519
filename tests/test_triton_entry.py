"""The triton backend's eager entry (backends/triton/entry.py): bitwise the general route's outputs and
gradients, and everything it must not serve goes back to that route. Without a GPU the kernels run in
Triton's interpreter on CPU tensors (a module or call that names backend="triton")."""

from __future__ import annotations

import itertools

import pytest
import torch

import rmsnorm
from rmsnorm import functional
from rmsnorm.backends import registry

from helpers import available, math64

pytestmark = [pytest.mark.skipif(not available("triton"), reason="triton backend unavailable"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class General(rmsnorm.RMSNorm):
    """A subclass: no eager entry, every call takes the general route (rmsnorm.ops.run)."""


def _pair(n, dtype, **kw):
    m = rmsnorm.RMSNorm(n, device=DEVICE, dtype=dtype, backend="triton", **kw)
    with torch.no_grad():
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
        if m.bias is not None:
            m.bias.uniform_(-0.5, 0.5)
    g = General(n, device=DEVICE, dtype=dtype, backend="triton", **kw)
    g.load_state_dict(m.state_dict())
    return m, g


def _served(m) -> bool:
    fast = m.__dict__.get("_entry")
    return bool(fast and fast[0] is not None and any(v is not None for v in fast[1].table.values()))


def _round_trip(mod, x, dy):
    xg = x.detach().clone().requires_grad_(True)
    for p in mod.parameters():
        p.grad = None
    y = mod(xg)
    y.backward(dy)
    return y, xg.grad, [p.grad for p in mod.parameters()]


OPTIONS = [{}, {"p": 0.5, "eps_mode": "outside"}, {"bias": True, "offset": 1.0}, {"cast": "llama"},
           {"elementwise_affine": False}, {"out_dtype": torch.float32}]


@pytest.mark.parametrize("dtype,shape,opts", list(itertools.product(
    [torch.float32, torch.bfloat16, torch.float16], [(1, 64), (8, 96), (3, 5, 33), (2, 1)], OPTIONS)))
def test_entry_is_the_general_route_bit_for_bit(dtype, shape, opts):
    m, g = _pair(shape[-1], dtype, eps=1e-6, **opts)
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    dy = torch.randn(shape, device=DEVICE, dtype=opts.get("out_dtype", dtype))
    for _ in range(2):  # the first call makes the entry, the second and third take it
        with torch.no_grad():
            m(x)
        _round_trip(m, x, dy)
    with torch.no_grad():
        assert torch.equal(m(x), g(x))
    y, dx, grads = _round_trip(m, x, dy)
    y2, dx2, grads2 = _round_trip(g, x, dy)
    assert _served(m) and type(y.grad_fn).__name__ == "EntryFunctionBackward"
    assert torch.equal(y, y2) and torch.equal(dx, dx2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    ref = math64(x, m.weight, m.bias, eps=1e-6, p=m.p, eps_mode=m.eps_mode, offset=m.offset)
    torch.testing.assert_close(y.double(), ref, atol=0.02 if dtype != torch.float32 else 1e-5, rtol=0.02)


def test_functional_calls_take_the_entry(monkeypatch):
    monkeypatch.setattr(functional, "_ENTRIES", {})  # (the cache stops growing at 256 option sets)
    x = torch.randn(4, 48, device=DEVICE)
    w = torch.rand(48, device=DEVICE) + 0.5
    first = rmsnorm.rms_norm(x, w, eps=1e-5, backend="triton")
    key = next(k for k in functional._ENTRIES if k[-2] == "triton" and k[-1] == x.device.type and k[0] == 1e-5)
    second = rmsnorm.rms_norm(x, w, eps=1e-5, backend="triton")
    assert functional._ENTRIES[key] is not None and torch.equal(first, second)
    assert any(v is not None for v in functional._ENTRIES[key][1].table.values())


@pytest.fixture(params=["cxx", "python"])
def keyer(request, monkeypatch):
    """The entry's key computed in C++ (kernel.cpp's triton_key, where the library is built) or in Python
    (entry._python_key, where it is not): both must serve and decline the same calls."""
    from rmsnorm.backends.cpu import build
    from rmsnorm.backends.triton import entry, prebound

    if request.param == "cxx":
        build.module()
        monkeypatch.setattr(prebound, "_cxx_state", [])
        want = build.module().triton_key
    else:
        monkeypatch.setattr(prebound, "_cxx_state", [None])
        want = entry._python_key
    return want


def _declined(m, x) -> bool:
    fast = m.__dict__["_entry"]
    return fast[0](fast[1], x, m.weight, m.bias, None) is None


def test_unusual_calls_go_back_to_the_general_route(keyer):
    m, g = _pair(32, torch.float32, eps=1e-6)
    x = torch.randn(6, 32, device=DEVICE)
    m(x)
    assert m.__dict__["_entry"][1].keyer is keyer
    assert not _declined(m, x)
    wide = torch.randn(32, 6, device=DEVICE).t()  # rows with a non-unit column stride
    neg = torch._neg_view(x.clone())
    cases = {"transposed": wide, "negative view": neg}
    for name, t in cases.items():
        assert _declined(m, t), name
        assert torch.equal(m(t), g(t)), name
    with torch.inference_mode():
        inf = torch.randn(6, 32, device=DEVICE)
    assert _declined(m, inf)  # grad mode: an inference tensor cannot be saved for backward
    assert torch.equal(m(inf), g(inf))
    assert m(x, torch.ones_like(x))[0].shape == x.shape  # a residual: the general route
    assert _declined(m, torch.randn(6, 31, device=DEVICE))  # wrong shape: the general route raises
    with pytest.raises(ValueError):
        m(torch.randn(6, 31, device=DEVICE))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        assert _declined(m, dual)
        assert torch.autograd.forward_ad.unpack_dual(m(dual)).tangent is not None
    out = torch.func.vmap(m)(x.unsqueeze(0).expand(3, 6, 32))
    assert torch.equal(out[1], g(x))


def test_key_follows_parameters_changed_in_place_of_the_module(keyer):
    m, g = _pair(16, torch.float32, eps=1e-6)
    x = torch.randn(5, 16, device=DEVICE)
    m(x)
    m(x)
    assert m.__dict__["_entry"][1].keyer is keyer
    for new in (m.weight.data.half(), m.weight.data[:8].clone(), torch.randn(32, device=DEVICE)[1:17]):
        m.weight.data = new  # .data keeps the Parameter: the entry must see the new dtype / shape / alignment
        g.weight.data = new.clone()
        if new.shape != (16,):
            with pytest.raises(ValueError):
                g(x)
            with pytest.raises(ValueError):
                m(x)
            continue
        with torch.no_grad():
            assert torch.equal(m(x), g(x))
    xs = torch.randn(81, device=DEVICE)
    misaligned = xs[1:].view(5, 16)  # 4-byte offset: another specialization
    m.weight.data = torch.ones(16, device=DEVICE)
    g.weight.data = torch.ones(16, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(m(misaligned), g(misaligned))


def test_unusual_gradients_take_the_general_backward():
    m, g = _pair(24, torch.float32, eps=1e-6)
    x = torch.randn(4, 24, device=DEVICE)
    for mod in (m, m):
        xg = x.clone().requires_grad_(True)
        mod(xg).sum().backward()  # dy is an expanded scalar: stride 0
    xg, xg2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    m(xg).sum().backward()
    g(xg2).sum().backward()
    assert torch.equal(xg.grad, xg2.grad)
    # create_graph=True: the differentiable decomposition, so second derivatives are exact
    xg = x.double().float().clone().requires_grad_(True)
    y = m(xg)
    (dx,) = torch.autograd.grad(y.pow(2).sum(), xg, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.sum(), xg)
    xr = x.clone().requires_grad_(True)
    yr = rmsnorm.rms_norm(xr, m.weight.detach(), eps=1e-6, backend="reference")
    (dxr,) = torch.autograd.grad(yr.pow(2).sum(), xr, create_graph=True)
    (ddxr,) = torch.autograd.grad(dxr.sum(), xr)
    torch.testing.assert_close(ddx, ddxr, rtol=1e-4, atol=1e-5)


def test_frozen_parameters_and_inputs_without_grad():
    m, g = _pair(40, torch.bfloat16, eps=1e-6, bias=True)
    m.weight.requires_grad_(False)
    g.weight.requires_grad_(False)
    x = torch.randn(7, 40, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(2):
        y = m(x)  # only the bias needs a gradient
        y.float().square().sum().backward()
    y2 = g(x)
    y2.float().square().sum().backward()
    assert torch.equal(y, y2) and torch.equal(m.bias.grad / 2, g.bias.grad)
    assert m.weight.grad is None


def test_a_changed_backend_choice_reaches_every_entry(monkeypatch):
    """An entry made for the automatic choice stops serving when the choice changes (set_default)."""
    from rmsnorm.backends.triton import entry

    made = entry.make(None, 1e-6, "inside", 1.0, "ceil", 0.0, "fp32", None, "triton")
    assert made is not None
    call, plan = made
    x, w = torch.randn(3, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    assert call(plan, x, w, None, None) is not None and plan.table
    auto = entry.make(None, 1e-6, "inside", 1.0, "ceil", 0.0, "fp32", None, None)
    try:
        registry.set_default("reference")
        assert entry.make(None, 1e-6, "inside", 1.0, "ceil", 0.0, "fp32", None, None) is None
        if auto is not None:
            assert auto[0](auto[1], x, w, None, None) is None  # the table was rebuilt: reference now
    finally:
        registry.set_default(None)
    assert call(plan, x, w, None, None) is not None


def test_a_module_moved_to_another_device_gets_that_devices_entry():
    m = rmsnorm.RMSNorm(8, device="meta")
    m(torch.randn(2, 8, device="meta"))
    assert m.__dict__["_entry"][2] == "meta"
    m.to_empty(device="cpu")
    with torch.no_grad():
        m.weight.fill_(1.0)
    x = torch.randn(2, 8)
    y = m(x)
    m(x)
    assert m.__dict__["_entry"][2] == "cpu"
    torch.testing.assert_close(y, math64(x, m.weight, eps=torch.finfo(torch.float32).eps).float())
