"""Model surgery on tiny Hugging Face models built from random configs (no downloads): accelerate keeps the
numerics of each family; the exact Pre-LN -> Pre-RMSNorm conversion keeps GPT-2's logits; convert swaps
LayerNorms by name."""

import pytest
import torch
from torch import nn

import rmsnorm
from rmsnorm.surgery import ExactConversionError, family_of

from helpers import default_backend

transformers = pytest.importorskip("transformers")

DTYPE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _decoder(name: str, dtype=torch.float32):
    t = transformers
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg, cls = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM), "mistral": (t.MistralConfig, t.MistralForCausalLM),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM), "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM),
    }[name]
    if name in ("gemma", "qwen3"):
        kw["head_dim"] = 16
    torch.manual_seed(0)
    model = cls(cfg(**kw)).eval().to(dtype)
    _randomize_norms(model)
    return model


def _t5(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(cfg).eval().to(dtype)
    _randomize_norms(model)
    return model


def _randomize_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if "Norm" in type(m).__name__ and isinstance(getattr(m, "weight", None), nn.Parameter):
                m.weight.copy_(torch.rand_like(m.weight.float()) * 0.8 + 0.1)


def _forward(model, ids):
    if isinstance(model, transformers.T5ForConditionalGeneration):
        return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    return model(ids).logits


def _grads(model, ids):
    model.zero_grad()
    _forward(model, ids).float().square().mean().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "t5"])
def test_accelerate_keeps_logits_and_gradients(family, dtype):
    model = _t5(dtype) if family == "t5" else _decoder(family, dtype)
    ids = torch.randint(3, 96, (2, 11))
    ref, ref_grads = _forward(model, ids).detach(), _grads(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = rmsnorm.accelerate(model)
    assert len(report.changed) >= 5 and not report.skipped, str(report)
    assert all(isinstance(m, rmsnorm.RMSNorm) for n, m in model.named_modules() if "norm" in n.split(".")[-1])
    out = _forward(model, ids).detach()
    tol = DTYPE_TOL[dtype]
    assert out.dtype == ref.dtype
    assert (out.float() - ref.float()).abs().max().item() <= tol * (1 + ref.float().abs().max().item())
    grads = _grads(model, ids)
    assert set(grads) == set(ref_grads)
    for k in grads:
        scale = 1 + ref_grads[k].float().abs().max().item()
        assert (grads[k].float() - ref_grads[k].float()).abs().max().item() <= 10 * tol * scale, k
    # state_dict round-trips: same keys, same values, and loads back
    new_state = model.state_dict()
    assert set(new_state) == set(state)
    assert all(torch.equal(new_state[k], state[k]) for k in state)
    model.load_state_dict(state)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_accelerate_greedy_generate_same_tokens(family):
    model = _decoder(family)
    ids = torch.randint(3, 96, (2, 6))
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    rmsnorm.accelerate(model)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), ref)


def test_accelerate_torch_rmsnorm_and_unknown_families():
    class Odd(nn.Module):  # looks like an RMSNorm by name, computes something else
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.weight

    Odd.__name__ = "OddRMSNorm"
    model = nn.Sequential(nn.RMSNorm(8, eps=1e-5), nn.Linear(8, 8), Odd())
    x = torch.randn(3, 8)
    ref = model(x)
    report = rmsnorm.accelerate(model)
    assert [n for n, _ in report.changed] == ["0"] and [n for n, _ in report.skipped] == ["2"]
    assert isinstance(model[0], rmsnorm.RMSNorm) and torch.allclose(model(x), ref, atol=1e-6)
    assert family_of(nn.RMSNorm) == "torch" and family_of(Odd) is None
    with pytest.raises(TypeError, match="model"):
        rmsnorm.accelerate("not a model")


def test_compile_accelerated_llama_has_no_graph_break():
    torch._dynamo.reset()
    model = _decoder("llama")
    rmsnorm.accelerate(model)
    ids = torch.randint(3, 96, (1, 8))
    explanation = torch._dynamo.explain(lambda i: model(i).logits)(ids)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(lambda i: model(i).logits, fullgraph=True)
    torch.testing.assert_close(compiled(ids), model(ids).logits, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def _gpt2(cls=None, n_layer=2):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=n_layer, n_head=4, vocab_size=96, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return _randomize_layernorms((cls or transformers.GPT2LMHeadModel)(cfg).eval(), bias_std=0.2)


def _randomize_layernorms(model, bias_std):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, bias_std)
    return model


@pytest.mark.parametrize("cls", ["GPT2LMHeadModel", "GPT2Model"])
def test_exact_conversion_keeps_gpt2_outputs(cls):
    model = _gpt2(getattr(transformers, cls), n_layer=3)
    ids = torch.randint(0, 96, (2, 17))
    get = (lambda o: o.logits) if cls == "GPT2LMHeadModel" else (lambda o: o.last_hidden_state)
    ref = get(model(ids)).detach()
    report = rmsnorm.convert(model, exact=True)
    out = get(model(ids)).detach()
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    changed = {n for n, _ in report.changed}
    expected = {"transformer.wte", "transformer.wpe", "transformer.ln_f"} if cls == "GPT2LMHeadModel" else {
        "wte", "wpe", "ln_f"}
    prefix = "transformer." if cls == "GPT2LMHeadModel" else ""
    for i in range(3):
        for part in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            expected.add(f"{prefix}h.{i}.{part}")
    assert expected <= changed
    # the residual stream is zero-mean: every norm input is centered
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].mean(-1).abs().max().item()))
             for m in model.modules() if isinstance(m, rmsnorm.RMSNorm)]
    model(ids)
    for h in hooks:
        h.remove()
    assert max(seen) < 1e-4


def test_exact_conversion_refuses_other_architectures():
    torch.manual_seed(0)
    llama = _decoder("llama")
    with pytest.raises(ExactConversionError, match="GPT-2"):
        rmsnorm.convert(llama, exact=True)
    with pytest.raises(ExactConversionError, match="GPT-2"):
        rmsnorm.convert(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), exact=True)
    with pytest.raises(ValueError, match="exact=True"):
        rmsnorm.convert(_gpt2(), exact=True, p=0.5)


def test_convert_swaps_layernorms_by_name():
    model = _gpt2()
    ids = torch.randint(0, 96, (2, 9))
    report = rmsnorm.convert(model, include="transformer.h.*", exclude="*.ln_2", p=0.25)
    changed = [n for n, _ in report.changed]
    assert changed == ["transformer.h.0.ln_1", "transformer.h.1.ln_1"]
    skipped = dict(report.skipped)
    assert skipped["transformer.h.0.ln_2"] == "matched by exclude"
    assert skipped["transformer.ln_f"] == "not matched by include"
    norm = model.transformer.h[0].ln_1
    assert isinstance(norm, rmsnorm.RMSNorm) and norm.p == 0.25 and norm.bias is None
    assert isinstance(model.transformer.h[0].ln_2, nn.LayerNorm)
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert norm.weight.grad is not None
    full = _gpt2()
    report = rmsnorm.convert(full, keep_bias=True)
    assert len(report.changed) == 5 and not any(isinstance(m, nn.LayerNorm) for m in full.modules())
    assert str(report).startswith("convert LayerNorm -> RMSNorm: 5 module(s) changed")


@pytest.mark.parametrize("bad,exc", [({"include": 3}, TypeError), ({"p": 0.0}, ValueError),
                                     ({"exclude": ["a", 1]}, TypeError)])
def test_convert_bad_arguments(bad, exc):
    with pytest.raises(exc):
        rmsnorm.convert(nn.Sequential(nn.LayerNorm(4)), **bad)
    with pytest.raises(TypeError, match="model"):
        rmsnorm.convert(None)


def test_surgery_cannot_replace_the_model_itself():
    """A bare norm passed as the model cannot be swapped in place: a clear error, never a report of a
    change that did not happen."""
    ln, norm = nn.LayerNorm(8), nn.RMSNorm(8)
    with pytest.raises(ValueError, match="pass the model that contains the norm"):
        rmsnorm.convert(ln)
    with pytest.raises(ValueError, match="pass the model that contains the norm"):
        rmsnorm.accelerate(norm)
    assert not list(ln.children()) and not list(norm.children())


# ------------------------------------------------------------------------------- all or nothing, subclasses
def _bigcode():
    cfg = transformers.GPTBigCodeConfig(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return _randomize_layernorms(transformers.GPTBigCodeForCausalLM(cfg).eval(), bias_std=0.1)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            {n: dict(m._forward_hooks) for n, m in model.named_modules()},
            {n: p.dtype for n, p in model.named_parameters()})


def _same(model, snap):
    state, modules, hooks, dtypes = snap
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert {n: dict(m._forward_hooks) for n, m in model.named_modules()} == hooks
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes


def test_exact_conversion_of_gptbigcode_keeps_logits():
    model = _bigcode()
    ids = torch.randint(3, 96, (2, 11))
    ref = model(ids).logits
    report = rmsnorm.convert(model, exact=True)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules()), str(report)
    out = model(ids).logits
    assert (out - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())


def test_a_failed_exact_conversion_leaves_the_model_as_it_was(monkeypatch):
    from rmsnorm.surgery import SurgeryError, exact

    model = _bigcode()
    model.transformer.h[0].ln_1.register_forward_hook(lambda *a: None)
    tied = model.lm_head.weight is model.transformer.wte.weight
    snap = _snapshot(model)
    ids = torch.randint(3, 96, (2, 11))
    ref = model(ids).logits
    calls = {"n": 0}
    real = exact._fold_into_conv_

    def failing(*a):
        calls["n"] += 1
        if calls["n"] == 3:  # after embeddings, writers and the first block were changed
            raise RuntimeError("injected failure")
        return real(*a)

    monkeypatch.setattr(exact, "_fold_into_conv_", failing)
    with pytest.raises(SurgeryError, match="left unchanged"):
        rmsnorm.convert(model, exact=True)
    _same(model, snap)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    assert model.config.tie_word_embeddings == tied
    assert torch.equal(model(ids).logits, ref)


class GainPlusOneLayerNorm(nn.LayerNorm):
    """As NemotronLayerNorm1P: y = LN(x) * (1 + w) + b."""

    def forward(self, x):
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class RowWiseLayerNorm(nn.LayerNorm):
    """As ChameleonLayerNorm: weight (4, 16), normalized over the last 16 only."""

    def forward(self, x):
        y = nn.functional.layer_norm(x, self.normalized_shape[-1:], None, None, self.eps)
        return y * self.weight + self.bias


def test_convert_layernorm_subclasses_by_what_they_compute():
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), GainPlusOneLayerNorm(16), nn.Linear(16, 64),
                          RowWiseLayerNorm((4, 16)))
    with torch.no_grad():
        model[2].weight.zero_()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    report = rmsnorm.convert(model)
    assert isinstance(model[1], rmsnorm.RMSNorm) and isinstance(model[2], rmsnorm.RMSNorm)
    assert model[2].offset == 1.0
    assert isinstance(model[4], RowWiseLayerNorm)
    assert any(name == "4" and "not LayerNorm's" in why for name, why in report.skipped), str(report)
    x = torch.randn(5, 16)
    x = x - x.mean(-1, keepdim=True)  # zero-mean rows: RMSNorm equals LayerNorm (bias aside)
    y = model[2](x)
    assert (y.pow(2).mean(-1).sqrt() - 1).abs().max() < 1e-3  # gain 1 + 0: unit RMS, not zero
    model[1](torch.randn(2, 16))
    assert seen == ["RMSNorm"]  # the hook moved to the replacement


def test_a_failed_convert_or_accelerate_leaves_the_model_as_it_was(monkeypatch):
    import sys

    from rmsnorm.surgery import SurgeryError

    convert, accelerate = sys.modules["rmsnorm.surgery.convert"], sys.modules["rmsnorm.surgery.accelerate"]
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8), nn.RMSNorm(8), nn.RMSNorm(8))
    snap = _snapshot(model)
    calls = {"n": 0}
    for mod in (convert, accelerate):
        real = mod.set_submodule

        def failing(*a, real=real):
            calls["n"] += 1
            if calls["n"] % 2 == 0:
                raise RuntimeError("injected failure")
            return real(*a)

        monkeypatch.setattr(mod, "set_submodule", failing)
    with pytest.raises(SurgeryError):
        rmsnorm.convert(model)
    _same(model, snap)
    with pytest.raises(SurgeryError):
        rmsnorm.accelerate(model)
    _same(model, snap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_t5_replacement_follows_the_models_dtype(dtype):
    model, ref = _t5(), _t5()
    ids = torch.randint(3, 96, (2, 11))
    rmsnorm.accelerate(model)
    model.to(dtype)
    ref.to(dtype)
    out, expect = _forward(model, ids), _forward(ref, ids)
    assert out.dtype == expect.dtype == dtype
    tol = DTYPE_TOL.get(dtype, 2e-2)
    assert (out.float() - expect.float()).abs().max().item() <= tol * (1 + expect.float().abs().max().item())


def test_llama4_norms_are_recognised():
    llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")
    holder = nn.ModuleDict({"norm": llama4.Llama4TextRMSNorm(64, eps=1e-5), "qk": llama4.Llama4TextL2Norm(1e-6)})
    with torch.no_grad():
        holder["norm"].weight.uniform_(0.5, 1.5)
    originals = {k: v for k, v in holder.items()}
    report = rmsnorm.accelerate(holder)
    assert len(report.changed) == 2 and not report.skipped, str(report)
    assert holder["norm"].weight is originals["norm"].weight
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 64, dtype=dtype)
        for k in ("norm", "qk"):
            a, b = holder[k](x), originals[k](x)  # same (fp32) gain; bf16 input: promotion as the original
            assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-5), k


def test_unweighted_grouped_and_shapeless_norms_are_recognised():
    """Gainless norms of no fixed shape (Inkling-2's unweighted RMSNorm, a Muse norm without a gain or dim)
    and Qwen4-Exp's grouped 1 + w norm are replaced with their numerics."""
    tf = pytest.importorskip("transformers")
    mods = {}
    for name, module, cls, kw in (("inkling", "inkling2", "Inkling2UnweightedRMSNorm", {"eps": 1e-6}),
                                  ("muse", "muse_glimmer", "MuseGlimmerRMSNorm", {"with_scale": False}),
                                  ("qwen4", "qwen4_exp", "Qwen4ExpTextRMSNorm", {"dim": 64}),
                                  ("qwen4_grouped", "qwen4_exp", "Qwen4ExpTextRMSNorm", {"dim": 64, "group_size": 16})):
        try:
            lib = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=[cls])
        except ImportError:
            continue
        mods[name] = getattr(lib, cls)(**kw)
    if not mods:
        pytest.skip(f"none of these families in transformers {tf.__version__}")
    holder = nn.ModuleDict(mods)
    with torch.no_grad():
        for m in holder.values():
            if getattr(m, "weight", None) is not None:
                m.weight.normal_(0.0, 0.5)
    originals = dict(holder.items())
    report = rmsnorm.accelerate(holder)
    assert len(report.changed) == len(mods) and not report.skipped, str(report)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 64, dtype=dtype)
        for k in mods:
            a, b = holder[k](x), originals[k](x)
            assert a.dtype == b.dtype, k
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
            else:  # at most one bf16 ulp apart
                assert (a.float() - b.float()).abs().max() <= 2 ** -7 * b.float().abs().max().clamp_min(1), k


def test_accelerate_partitioned_weights():
    """DeepSpeed ZeRO-3 leaves each weight as an empty shard with its full shape in ds_shape."""
    model = _decoder("llama")
    ids = torch.randint(3, 96, (2, 11))
    ref = _forward(model, ids).detach()
    full = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "LlamaRMSNorm":
            full[name] = m.weight.data
            m.weight.data = torch.empty(0)
            m.weight.ds_shape = tuple(full[name].shape)
    report = rmsnorm.accelerate(model)
    assert len(report.changed) == len(full) and not report.skipped, str(report)
    for name, data in full.items():  # "gather": the shared parameter gets its data back
        model.get_submodule(name).weight.data = data
    out = _forward(model, ids).detach()
    assert (out - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())


def _family(name, **over):
    t = transformers
    small = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    cfg, cls, kw = {
        "gpt-neo": (t.GPTNeoConfig, t.GPTNeoForCausalLM,
                    dict(vocab_size=96, max_position_embeddings=64, hidden_size=64, num_layers=2, num_heads=4,
                         attention_types=[[["global", "local"], 1]], window_size=16)),
        "gpt-j": (t.GPTJConfig, t.GPTJForCausalLM, dict(vocab_size=96, n_positions=64, n_embd=64, n_layer=2,
                                                       n_head=4, rotary_dim=8)),
        "opt": (t.OPTConfig, t.OPTForCausalLM, dict(vocab_size=96, max_position_embeddings=64, hidden_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                                    word_embed_proj_dim=64)),
        "codegen": (t.CodeGenConfig, t.CodeGenForCausalLM, dict(vocab_size=96, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64, rotary_dim=8, bos_token_id=1,
                                                                eos_token_id=2)),
        "gpt-neox": (t.GPTNeoXConfig, t.GPTNeoXForCausalLM, dict(small, intermediate_size=128)),
        "phi": (t.PhiConfig, t.PhiForCausalLM, dict(small, intermediate_size=128)),
        "falcon": (t.FalconConfig, t.FalconForCausalLM, dict(small)),
        "stablelm": (t.StableLmConfig, t.StableLmForCausalLM,
                     dict(small, intermediate_size=128, num_key_value_heads=4)),
    }[name]
    torch.manual_seed(0)
    return _randomize_layernorms(cls(cfg(**{**kw, **over})).eval(), bias_std=0.1)


@pytest.mark.parametrize("family,over", [("gpt-neo", {}), ("gpt-j", {}), ("opt", {}), ("codegen", {}),
                                         ("gpt-neox", {}), ("gpt-neox", {"use_parallel_residual": False}),
                                         ("phi", {}), ("falcon", {}), ("falcon", {"new_decoder_architecture": True}),
                                         ("falcon", {"parallel_attn": False}), ("falcon", {"bias": True}),
                                         ("stablelm", {}), ("stablelm", {"use_parallel_residual": True})])
def test_exact_conversion_of_other_pre_ln_families(family, over):
    model = _family(family, **over)
    ids = torch.randint(3, 96, (2, 11))
    ref = model(ids).logits
    report = rmsnorm.convert(model, exact=True)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules()), str(report)
    out = model(ids).logits
    assert (out - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item()), (family, over, str(report))
    out.square().mean().backward()  # still trains


def test_bloom_is_refused_before_any_change():
    t = transformers
    torch.manual_seed(0)
    model = t.BloomForCausalLM(t.BloomConfig(vocab_size=96, hidden_size=64, n_layer=2, n_head=4)).eval()
    snap = _snapshot(model)
    with pytest.raises(ExactConversionError, match="Falcon"):
        rmsnorm.convert(model, exact=True)
    _same(model, snap)


def test_post_ln_opt_is_refused_before_any_change():
    model = _family("opt", do_layer_norm_before=False)
    snap = _snapshot(model)
    with pytest.raises(ExactConversionError, match="post-LN"):
        rmsnorm.convert(model, exact=True)
    _same(model, snap)


class _LlamaWrittenOtherwiseRMSNorm(nn.Module):
    """Llama's numerics in source no family has: found by probing."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        dtype, h = x.dtype, x.float()
        h = h * (h * h).mean(dim=-1, keepdim=True).add(self.eps).rsqrt()
        return self.weight * h.to(dtype)


class _EpsOutsideRMSNorm(_LlamaWrittenOtherwiseRMSNorm):
    def forward(self, x):
        h = x.float()
        return self.weight * (h / (h.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)).to(x.dtype)


class _GainlessRMSNorm(nn.Module):
    def __init__(self, eps=1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        h = x.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class _RoundedRstdRMSNorm(_GainlessRMSNorm):  # DeepSeek-V4's unweighted norm: 1/RMS rounded to x's dtype
    def forward(self, x):
        return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype)


class _GainedRoundedRstdRMSNorm(_LlamaWrittenOtherwiseRMSNorm):  # the same rounding, with a gain
    def forward(self, x):
        scale = x.to(torch.float32).pow(2).mean(dim=-1, keepdim=True).add(self.eps).rsqrt().to(x.dtype)
        return self.weight * (x * scale)


class _InverseOnlyRMSNorm(_GainlessRMSNorm):  # HY-V4: returns 1/RMS, not a normalized x
    def forward(self, x):
        return torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unknown_sources_are_recognised_by_probing_their_forward(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(_LlamaWrittenOtherwiseRMSNorm(32), nn.Linear(32, 32), _EpsOutsideRMSNorm(32),
                          _GainlessRMSNorm(), _RoundedRstdRMSNorm(), _LlamaWrittenOtherwiseRMSNorm(32, eps=1e-3))
    with torch.no_grad():
        for m in (model[0], model[2], model[5]):
            m.weight.normal_()
    model = model.to(dtype)
    fired = []
    model[0].register_forward_hook(lambda *a: fired.append(1))
    x = torch.randn(4, 7, 32, dtype=dtype)
    ref = model(x)
    fired.clear()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = rmsnorm.accelerate(model)
    assert not fired, "probing must not call the module itself (its hooks fired)"
    assert [n for n, _ in report.changed] == ["0", "3", "4", "5"]
    assert all("probing" in why for n, why in report.changed if n != "4")  # 4: a known source (l2norm_rstd)
    assert {n: "no family's numerics match" in why for n, why in report.skipped} == {"2": True}
    assert isinstance(model[0], rmsnorm.RMSNorm) and model[5].eps == 1e-3
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with default_backend("reference"):
        assert torch.equal(model(x), ref)
    out = model(x)
    tol = DTYPE_TOL[dtype]
    assert out.dtype == ref.dtype and torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol)
    assert fired  # the hook moved with the module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rounded_inverse_rms_norms_are_replaced_with_their_rounding(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(_RoundedRstdRMSNorm(1e-6), nn.Linear(48, 48), _GainedRoundedRstdRMSNorm(48),
                          _InverseOnlyRMSNorm())
    with torch.no_grad():
        model[2].weight.normal_()
    model = model.to(dtype)
    x = torch.randn(3, 5, 48, dtype=dtype) * 4
    ref = model[:3](x)
    report = rmsnorm.accelerate(model)
    assert [n for n, _ in report.changed] == ["0", "2"], str(report)
    assert model[0].cast == "rstd" and model[2].cast == "rstd"
    assert "returns a statistic" in dict(report.skipped)["3"]
    with default_backend("reference"):
        assert torch.equal(model[:3](x), ref)  # bit for bit, in every dtype
    out = model[:3](x)  # the cpu kernels: bitwise in bf16/fp16 (the rounded 1/RMS hides the sum order)
    assert out.dtype == ref.dtype
    if dtype != torch.float32:
        assert torch.equal(out, ref)
    else:
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


class _CpmAntLayerNorm(nn.Module):  # an RMSNorm named LayerNorm (CPM-Ant), with Llama's numerics
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.eps, self.dim_norm = eps, n
        self.weight = nn.Parameter(torch.randn(n))

    def forward(self, hidden_states):
        if hidden_states.size(-1) != self.dim_norm:
            raise AssertionError("hidden_states.size(-1) != self.dim_norm")
        old_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
        return (hidden_states * torch.rsqrt(variance + self.eps)).to(old_dtype) * self.weight


class _CenteredLayerNorm(_CpmAntLayerNorm):  # a LayerNorm that is no nn.LayerNorm (Cohere): not ours
    def forward(self, x):
        h = x.float() - x.float().mean(-1, keepdim=True)
        return (self.weight.float() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class _BiasedRMSNorm(_CpmAntLayerNorm):  # a bias the probe's zeros would hide: refused
    def __init__(self, n):
        super().__init__(n)
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return _CpmAntLayerNorm.forward(self, x) + self.bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_named_rmsnorms_are_probed_and_layernorms_left_unreported(dtype):
    model = nn.Sequential(_CpmAntLayerNorm(40), _CenteredLayerNorm(40), _BiasedRMSNorm(40)).to(dtype)
    x = torch.randn(3, 40, dtype=dtype)
    ref = model(x)
    report = rmsnorm.accelerate(model)
    assert [n for n, _ in report.changed] == ["0"] and "llama numerics" in report.changed[0][1]
    # 1 is a LayerNorm (not reported); 2 has a bias the probe would not see
    assert [(n, "besides a gain: ['bias']" in why) for n, why in report.skipped] == [("2", True)]
    with default_backend("reference"):
        assert torch.equal(model(x), ref)


def test_probing_refuses_modules_it_cannot_run():
    class NeedsGateRMSNorm(_LlamaWrittenOtherwiseRMSNorm):
        def forward(self, x, gate):
            return super().forward(x) * gate

    class NoEpsRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    model = nn.Sequential(NeedsGateRMSNorm(8), NoEpsRMSNorm())
    report = rmsnorm.accelerate(model)
    assert not report.changed
    why = dict(report.skipped)
    assert "raised TypeError" in why["0"] and "stores no eps" in why["1"]
