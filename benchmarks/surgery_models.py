"""Model-level coverage of ``rmsnorm.accelerate`` over the installed transformers: tiny random models of every
family that defines an RMSNorm-like class, their logits and gradients before and after.

    python benchmarks/surgery_models.py [--out docs/surgery-models.md] [--families a,b,...] [--limit N]

For each model type whose modeling module defines a class named like an RMSNorm (RMSNorm, L2Norm,
T5LayerNorm) or a norm named LayerNorm that is a plain nn.Module, the default config is shrunk (hidden
size 64, 2 layers, 4 heads, vocabulary 128, experts 4, and the same in every sub-config), a causal LM
(else the base model) is built from it with a fixed seed on CPU, and a copy is put through
``rmsnorm.accelerate``. On random token ids (a random image for a vision model without token inputs):

- fp32: max |Δ logits| over (1 + max |logits|) between the original and the accelerated copy;
- bf16: both models cast with ``.to(torch.bfloat16)``: identical logits, or the max difference in ulps;
- grads: one backward of the fp32 logits' sum: max |Δ| over (1 + max |grad|) across all parameters.

Families whose tiny model cannot be built or run this way (multimodal inputs, encoder-decoders that need
more than input ids, configs the shrinking breaks) are listed with the reason; they are not checked here
(the module-level table, docs/surgery.md, covers their norm classes).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import re
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import rmsnorm

# RMSNorm-like classes, and norms named LayerNorm that are no nn.LayerNorm (accelerate probes those too)
NORM = re.compile(r"^class (\w*(?:RMSNorm|L2Norm|T5LayerNorm)\w*\(|\w*LayerNorm\(nn\.Module\))", re.M)
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 256,
         "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16, "n_embd": 64, "n_layer": 2,
         "n_head": 4, "moe_intermediate_size": 32, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
         "num_experts_per_tok": 2, "num_experts_per_token": 2, "shared_expert_intermediate_size": 32,
         "kv_lora_rank": 16, "q_lora_rank": 16,
         "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "first_k_dense_replace": 1,
         "embed_dim": 64, "projection_dim": 64, "num_decoder_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
         "sliding_window": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
         "linear_value_head_dim": 16, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1,
         "mamba_d_state": 16, "ssm_state_size": 16, "n_groups": 1, "num_global_layers": 1,
         "index_n_heads": 4, "index_head_dim": 16, "index_topk": 8, "vocab_size_per_layer_input": 128,
         "hidden_size_per_layer_input": 16, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
         "encoder_ffn_dim": 128, "decoder_ffn_dim": 128}
WIDE, WIDE_KEY = 1024, re.compile(r"intermediate|ffn_hidden|hidden_size_global|projector_hidden|group_vocab")
IMAGE = 64  # image side for vision models whose config has no int image_size
MAX_PARAMS = 80_000_000  # (a few configs keep large vision or audio towers)


def families(limit: int | None = None, only: set[str] | None = None) -> list[str]:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    out = []
    for model_type in CONFIG_MAPPING_NAMES:
        if only is not None and model_type not in only:
            continue
        folder = root / model_type.replace("-", "_")
        files = list(folder.glob("modeling_*.py")) if folder.is_dir() else []
        if any(NORM.search(f.read_text()) for f in files):
            out.append(model_type)
        if limit and len(out) >= limit:
            break
    return out


def shrink(cfg) -> None:
    """Make a default config tiny, in place (and its sub-configs)."""
    from transformers import PretrainedConfig

    for key, value in SMALL.items():
        if isinstance(vars(cfg).get(key), int) and not isinstance(vars(cfg).get(key), bool):
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(cfg, key, value)
    for key, value in list(vars(cfg).items()):  # other widths: feed-forward and projector sizes, hashed vocabularies
        if isinstance(value, int) and not isinstance(value, bool) and value > WIDE and WIDE_KEY.search(key):
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(cfg, key, SMALL["hidden_size" if "global" in key else "intermediate_size"])
    n = vars(cfg).get("num_hidden_layers")
    for key in ("layer_types", "layers_block_type", "hybrid_override_pattern", "block_types", "mlp_layer_types"):
        v = vars(cfg).get(key)
        if isinstance(n, int) and isinstance(v, (list, tuple)) and len(v) > n:
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(cfg, key, type(v)(v[:n]))
    v = vars(cfg)
    if isinstance(v.get("qk_rope_head_dim"), int) and "head_dim" in v:  # multi-head latent attention
        cfg.head_dim = cfg.qk_rope_head_dim
    if isinstance(v.get("kv_lora_rank"), int) and isinstance(v.get("num_attention_heads"), int):
        cfg.num_key_value_heads = cfg.num_attention_heads  # latent attention: one key/value head per head
    if all(isinstance(v.get(k), int) for k in ("qk_head_dim", "qk_rope_head_dim", "qk_nope_head_dim")):
        cfg.qk_head_dim = cfg.qk_rope_head_dim + cfg.qk_nope_head_dim
    for heads, dim in (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim")):
        if isinstance(v.get(heads), int) and isinstance(v.get(dim), int):  # heads x head dim = expand x hidden
            setattr(cfg, dim, int(v.get("mamba_expand", 2)) * SMALL["hidden_size"] // getattr(cfg, heads))
    if all(isinstance(v.get(k), int) for k in ("expand", "num_heads", "head_dim")):  # Mamba-2
        cfg.head_dim = cfg.expand * SMALL["hidden_size"] // cfg.num_heads
    if all(isinstance(v.get(k), int) for k in ("mamba_expand", "mamba_headdim")):  # Zamba2
        cfg.mamba_headdim = cfg.mamba_expand * SMALL["hidden_size"] // max(1, v.get("n_mamba_heads", 8) or 8)
    if all(isinstance(v.get(k), int) for k in ("mamba_d_ssm", "mamba_n_heads", "mamba_d_head")):  # Falcon-H1
        cfg.mamba_d_ssm = cfg.mamba_n_heads * cfg.mamba_d_head
    # fields a default config leaves unset that its model needs once the config is small
    if "n_routed_experts" in v and v["n_routed_experts"] is None:
        cfg.n_routed_experts = SMALL["n_routed_experts"]
    if "n_shared_experts" in v and v["n_shared_experts"] is None:
        cfg.n_shared_experts = 1
    if "conv_L_cache" in v and v.get("layer_types") is None:  # LFM2: a short-convolution and an attention layer
        cfg.layer_types = ["conv", "full_attention"]
    if "sliding_window" in v and v["sliding_window"] is None:  # longer than the inputs: no effect on them
        cfg.sliding_window = SMALL["sliding_window"]
    if "head_dim" in v and v["head_dim"] is None:
        cfg.head_dim = SMALL["head_dim"]
    if "num_experts_per_tok" in v and v["num_experts_per_tok"] is None:
        cfg.num_experts_per_tok = SMALL["num_experts_per_tok"]
    for key in ("n_group", "num_expert_group", "topk_group"):  # expert groups: one group of the 4 experts
        if isinstance(v.get(key), int):
            setattr(cfg, key, 1)
    if "use_cache" in v:
        cfg.use_cache = False
    if isinstance(v.get("image_size"), int) and isinstance(v.get("patch_size"), int):  # a 4 x 4 patch image
        cfg.image_size = min(cfg.image_size, 4 * cfg.patch_size)
    rope = v.get("rope_parameters")
    if (isinstance(rope, dict) and "mrope_section" in rope) or _uses_mrope(cfg):
        cfg.rope_parameters = {**(rope or {"rope_type": "default"}), "mrope_section": _mrope_sections(cfg)}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = vars(cfg).get(key)
        if isinstance(v, int) and v >= SMALL["vocab_size"]:
            setattr(cfg, key, 0)
    for value in list(vars(cfg).values()):
        if isinstance(value, PretrainedConfig):
            shrink(value)


def _mrope_sections(cfg) -> list[int]:
    """Multimodal rotary sections (time, height, width) in the full configs' proportions (1/4, 3/8, 3/8)
    summing to half the rotary dims of the small head_dim."""
    rope = vars(cfg).get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", vars(cfg).get("partial_rotary_factor") or 1.0)
    half = int(SMALL["head_dim"] * factor) // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _uses_mrope(cfg) -> bool:
    """Whether the config's modeling code splits rotary frequencies into multimodal sections, with a
    default for them (sized for the full head_dim) when the config has none."""
    module = sys.modules.get(type(cfg).__module__.replace(".configuration_", ".modeling_"))
    if module is None:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(type(cfg).__module__.replace(".configuration_", ".modeling_"))
    return module is not None and "mrope_section" in Path(module.__file__ or "").read_text()


def build(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type)
    shrink(cfg)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False

    def make():
        try:
            return AutoModelForCausalLM.from_config(cfg)
        except ValueError:  # no causal LM for this config
            return AutoModel.from_config(cfg)

    with torch.device("meta"):
        params = sum(p.numel() for p in make().parameters())
    if params > MAX_PARAMS:
        raise RuntimeError(f"{params / 1e6:.0f}M parameters after shrinking the config")
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():  # random gains: a ones-initialised gain would hide a lost or doubled gain
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:
                p.normal_(0.0, 0.5)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's output on token ids (or, for a vision model without token inputs, on a fixed random image
    of the config's image size, IMAGE pixels a side where the config has no int one)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params and "pixel_values" in params:
        cfg = model.config
        size = getattr(cfg, "image_size", IMAGE)
        size = size if isinstance(size, int) else IMAGE
        dtype = next(model.parameters()).dtype
        pixels = torch.randn(ids.shape[0], getattr(cfg, "num_channels", 3), size, size,
                             generator=torch.Generator().manual_seed(2)).to(dtype)
        out = model(pixel_values=pixels)
        return out.logits if getattr(out, "logits", None) is not None else out[0]
    extra = {"decoder_input_ids": ids} if "decoder_input_ids" in params else {}
    out = model(input_ids=ids, **extra)
    t = out.logits if getattr(out, "logits", None) is not None else out[0]
    return t


@contextlib.contextmanager
def reference():
    """Every rmsnorm call on the reference backend (plain torch ops) inside."""
    from rmsnorm.backends import registry

    before = registry.default()
    registry.set_default("reference")
    try:
        yield
    finally:
        registry.set_default(before)


def check(model_type: str) -> dict:
    row: dict = {"family": model_type}
    try:
        original = build(model_type)
        ids = torch.randint(3, SMALL["vocab_size"] - 1, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = logits(original, ids)
    except Exception as exc:  # every failure is reported, none stops the table
        row["result"] = f"not built: {type(exc).__name__}: {str(exc).splitlines()[0][:110]}"
        return row
    fast = copy.deepcopy(original)
    report = rmsnorm.accelerate(fast)
    changed, left = len(report.changed), len(report.skipped)
    row["result"] = f"{changed} replaced, {left} left" + (
        f" ({'; '.join(sorted({why for _, why in report.skipped}))[:140]})" if left else "")
    if not changed:
        return row
    with torch.no_grad():
        got = logits(fast, ids)
        with reference():
            row["ref_fp32"] = torch.equal(logits(fast, ids), ref)
    row["fp32"] = (got - ref).abs().max().item() / (1 + ref.abs().max().item())
    b_orig, b_fast = copy.deepcopy(original).to(torch.bfloat16), copy.deepcopy(fast).to(torch.bfloat16)
    try:
        with torch.no_grad():
            lo = logits(b_orig, ids).float()
    except Exception as exc:  # the original itself does not run in bf16 on CPU: nothing to compare
        row["bf16_note"] = f"the original fails in bf16 ({type(exc).__name__})"
    else:
        with torch.no_grad():
            lf = logits(b_fast, ids).float()
            with reference():
                lr = logits(b_fast, ids).float()
        ulp = torch.finfo(torch.bfloat16).eps * (1 + lo.abs().max().item())
        row["bf16"] = 0.0 if torch.equal(lo, lf) else (lf - lo).abs().max().item() / ulp
        row["ref_bf16"] = torch.equal(lo, lr)
    grads = []
    for m in (original, fast):
        m.zero_grad(set_to_none=True)
        logits(m, ids).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    worst = 0.0
    for n, g in grads[0].items():
        h = grads[1].get(n)
        if h is None:
            worst = float("inf")
            break
        worst = max(worst, (g - h).abs().max().item() / (1 + g.abs().max().item()))
    row["grads"] = worst
    return row


def within(row: dict) -> bool:
    bf16_ok = row.get("bf16", 99.0) <= 1.0 or "bf16_note" in row
    return row.get("fp32", 1.0) <= 1e-5 and bf16_ok and row.get("grads", 1.0) <= 1e-4


def markdown(rows: list[dict], seconds: float) -> str:
    import transformers

    checked = [r for r in rows if "fp32" in r]
    ok = [r for r in checked if within(r)]
    lines = [
        "# Surgery coverage (model level)", "",
        f"Made by `python benchmarks/surgery_models.py` on {time.strftime('%Y-%m-%d')} with transformers "
        f"{transformers.__version__}, torch {torch.__version__} ({seconds:.0f} s): every model type whose modeling "
        "module defines an RMSNorm-like class, as a tiny random model (hidden 64, 2 layers, 4 heads, vocabulary "
        "128, norm gains randomized), before and after `rmsnorm.accelerate`: fp32 max |Δ logits| over (1 + max "
        "|logits|), bf16 logits identical (0) or their max difference in bf16 ulps of (1 + max |logits|), and the "
        "fp32 gradients of every parameter after one backward (max |Δ| over (1 + max |grad|)), on the default "
        "backend (cpu); and whether the logits are bitwise the original's with every norm on the reference "
        "backend (plain torch ops, as the originals). The fused kernels sum squares in another order than "
        "torch's mean, so single norms differ from the original by at most one bf16 ulp, which a model carries "
        "on. The reference backend makes each norm's rows contiguous before it reduces them; a norm that receives "
        "a non-contiguous view (Inkling-2's per-head value norm) is reduced by torch in another order, one fp32 "
        "ulp apart, hence its 'no'. Targets: fp32 ≤ 1e-5, bf16 ≤ 1 ulp, grads ≤ 1e-4. Families whose tiny "
        "model could not be built and run on token ids (or, for vision models without token inputs, a random "
        "image) are listed with the reason; their norm classes are in the module-level table "
        "([surgery.md](surgery.md)).", "",
        f"{len(rows)} families: {len(checked)} built with at least one norm replaced and compared, {len(ok)} within "
        f"the targets; {sum(1 for r in rows if r['result'].startswith('not built'))} not built; "
        f"{sum(1 for r in rows if 'fp32' not in r and not r['result'].startswith('not built'))} built with nothing "
        "replaced.", "",
        "| family | accelerate | fp32 rel | bf16 ulps | grads rel | within | reference backend: fp32, bf16 bitwise |",
        "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "fp32" in r:
            bf16 = f"{r['bf16']:.2f}" if "bf16" in r else f"n/a: {r['bf16_note']}"
            bits = f"{'yes' if r['ref_fp32'] else '**no**'}, " + (
                ("yes" if r["ref_bf16"] else "**no**") if "ref_bf16" in r else "n/a")
            lines.append(f"| {r['family']} | {r['result']} | {r['fp32']:.1e} | {bf16} | {r['grads']:.1e} | "
                         f"{'yes' if within(r) else '**no**'} | {bits} |")
        else:
            lines.append(f"| {r['family']} | {r['result'].replace('|', '/')} | – | – | – | – | – |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/surgery-models.md"))
    p.add_argument("--families", default=None, help="comma-separated model types (default: all)")
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    importlib.import_module("transformers").logging.set_verbosity_error()
    torch.set_num_threads(2)
    only = set(args.families.split(",")) if args.families else None
    start = time.monotonic()
    rows = []
    for model_type in families(args.limit, only):
        rows.append(check(model_type))
        r = rows[-1]
        print(f"{model_type}: {r['result'][:100]}" + (f" fp32 {r['fp32']:.1e} bf16 {r.get('bf16', 'n/a')} grads "
                                                        f"{r['grads']:.1e}" if "fp32" in r else ""), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, time.monotonic() - start))
    bad = [r["family"] for r in rows if "fp32" in r and not within(r)]
    print(f"wrote {args.out}; outside the targets: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
