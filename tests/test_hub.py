"""rmsnorm as a `kernels` layer: kernelize swaps the forward of hub-tagged RMSNorm classes, numerics kept."""

import pytest
import torch
from torch import nn

kernels = pytest.importorskip("kernels")

from rmsnorm.hub import RMSNorm, kernel_mapping  # noqa: E402

# transformers' LlamaRMSNorm, tagged as transformers tags it when its hub integration is on (it needs a newer
# kernels release than the one installed here, so the test applies the kernels package's own decorator)
LlamaStyleRMSNorm = kernels.use_kernel_forward_from_hub("RMSNorm")(
    pytest.importorskip("transformers.models.llama.modeling_llama").LlamaRMSNorm)


@kernels.use_kernel_forward_from_hub("RMSNorm")
class UnknownNorm(nn.Module):  # tagged, but computes something else: keeps its own forward
    def __init__(self, hidden_size):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states):
        return hidden_states * self.weight * 2


def _model(dtype):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), LlamaStyleRMSNorm(32), nn.Linear(32, 32), UnknownNorm(32)).to(dtype)
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["INFERENCE", "TRAINING"])
def test_kernelize_keeps_outputs_and_gradients(dtype, mode):
    ref, model = _model(dtype), _model(dtype)
    x = torch.randn(5, 16, dtype=dtype)
    with kernels.use_kernel_mapping(kernel_mapping()):
        model = kernels.kernelize(model, mode=getattr(kernels.Mode, mode), device="cpu")
    assert model[1].forward.__func__ is RMSNorm.forward
    out, expect = model(x), ref(x)
    assert torch.equal(out, expect) if dtype == torch.bfloat16 else torch.allclose(out, expect, atol=1e-6)
    if mode == "TRAINING" and dtype == torch.float32:  # (bf16: the original's bf16 op chain rounds more)
        out.float().square().sum().backward()
        expect.float().square().sum().backward()
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_kernelized_model_compiles_and_matches():
    model = _model(torch.float32)
    x = torch.randn(5, 16)
    expect = model(x)
    with kernels.use_kernel_mapping(kernel_mapping()):
        model = kernels.kernelize(model, mode=kernels.Mode.INFERENCE | kernels.Mode.TORCH_COMPILE, device="cpu")
    import rmsnorm.hub

    assert rmsnorm.hub._OPTIONS[LlamaStyleRMSNorm] == ("llama", 0.0)  # resolved when kernelize loaded the layer
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), expect, rtol=1e-5, atol=1e-5)
    assert rmsnorm.backends()  # the library stays importable alongside kernels
