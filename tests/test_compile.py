"""torch.compile(fullgraph=True) and torch.export see one custom op per norm, with no graph break."""

import pytest
import torch

import rmsnorm
from rmsnorm.spec import Spec

from helpers import default_backend, rand


class Block(torch.nn.Module):
    def __init__(self, d=64, **kw):
        super().__init__()
        self.n1 = rmsnorm.RMSNorm(d, **kw)
        self.fc = torch.nn.Linear(d, d)
        self.n2 = rmsnorm.RMSNorm(d, p=0.25, bias=True)

    def forward(self, x, res):
        y, h = self.n1(x, residual=res)
        return self.n2(self.fc(y)) + h


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", [None, "reference"])
def test_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(0)
    model = Block()
    x, res = rand(4, 64).requires_grad_(True), rand(4, 64)
    with default_backend(backend):
        eager = model(x, res)
        eager.square().sum().backward()
        g_eager = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
        model.zero_grad()
        x.grad = None
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        out = compiled(x, res)
        out.square().sum().backward()
        g_comp = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_no_graph_break_and_custom_op_in_graph():
    model = Block()
    x, res = rand(4, 64), rand(4, 64)
    explanation = torch._dynamo.explain(model)(x, res)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    graph_code = "\n".join(g.code for g in explanation.graphs)
    assert "rmsnorm.forward" in graph_code


def test_torch_export():
    model = Block().eval()
    x, res = rand(4, 64), rand(4, 64)
    ep = torch.export.export(model, (x, res))
    assert any("rmsnorm.forward" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x, res), model(x, res))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 8, dtype=torch.bfloat16)
        w = torch.empty(8, dtype=torch.float32)
        y, h = rmsnorm.rms_norm(x, w, residual=torch.empty(2, 3, 8, dtype=torch.float32))
        assert y.shape == (2, 3, 8) and y.dtype == torch.float32 and h.dtype == torch.float32


def test_opcheck():
    x, w, b, r = rand(3, 16), rand(16), rand(16), rand(3, 16)
    spec = Spec(1, 8, 1e-6, False, 0.5, None, torch.float32, True).encode()
    args = (x, w, b, r, spec, "reference")
    torch.library.opcheck(torch.ops.rmsnorm.forward.default, args)
    _y, h, rstd = torch.ops.rmsnorm.forward(*args)
    bargs = (rand(3, 16), rand(3, 16), h, w, b, rstd, spec, True, True, "reference")
    torch.library.opcheck(torch.ops.rmsnorm.backward.default, bargs)
