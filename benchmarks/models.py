"""Forward+backward step time of whole models on CPU, before and after surgery (random weights, no downloads).

    python benchmarks/models.py [--rounds 5] [--steps 3] [--out docs/benchmarks/models.md]

- GPT-2 small (124M: 12 layers, 768 wide), Hugging Face GPT2LMHeadModel, before and after
  ``rmsnorm.convert(model, exact=True)`` (the outputs are checked equal first);
- a Llama-style model of about the same size (12 layers, 768 wide, 2048 MLP), LlamaForCausalLM, before
  and after ``rmsnorm.accelerate(model)``, in fp32 and bf16.
Each pair is timed round-robin (``rounds`` rounds of ``steps`` optimizer-free forward+backward steps of
each model), so the machine's drifts hit both alike; the table gives the median seconds per step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import rmsnorm
from rmsnorm.host import allocator, cpu_model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()


def _time_pair(a, b, ids, rounds: int, steps: int) -> tuple[float, float]:
    for m in (a, b):
        _step(m, ids)
    ta, tb = [], []
    for r in range(rounds):
        for m, acc in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            for _ in range(steps):
                _step(m, ids)
            acc.append((time.perf_counter() - t0) / steps)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    import transformers

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=12, help="layers of both models (12: GPT-2 small)")
    p.add_argument("--width", type=int, default=768, help="hidden size of both models (768: GPT-2 small)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (args.batch, args.seq))
    rows = []

    heads = max(1, args.width // 64)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        bos_token_id=0, eos_token_id=0, n_layer=args.layers, n_embd=args.width, n_head=heads)).train()
    conv = copy.deepcopy(gpt2)
    report = rmsnorm.convert(conv, exact=True)
    gids = ids % gpt2.config.vocab_size
    with torch.no_grad():
        gpt2.eval(), conv.eval()
        a, b = gpt2(gids).logits, conv(gids).logits
        err = ((a - b).abs().max() / a.abs().max()).item()
    gpt2.train(), conv.train()
    for m in (gpt2, conv):  # no dropout: the two models then compute the same function, so the timing
        for mod in m.modules():  # compares like with like
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    t0, t1 = _time_pair(gpt2, conv, gids, args.rounds, args.steps)
    mparams = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.0f}M"
    rows.append((f"GPT-2 {args.layers}x{args.width} ({mparams(gpt2)}), fp32", "LayerNorm (torch)",
                 "exact Pre-RMSNorm (rmsnorm)", t0, t1,
                 f"max relative logit difference {err:.1e}; {len(report.changed)} modules changed"))

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=args.width, intermediate_size=args.width * 8 // 3,
                                   num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=512)
    for dtype in (torch.float32, torch.bfloat16):
        llama = transformers.LlamaForCausalLM(cfg).to(dtype)
        acc = copy.deepcopy(llama)
        rep = rmsnorm.accelerate(acc)
        with torch.no_grad():
            a, b = llama(ids).logits.float(), acc(ids).logits.float()
            err = ((a - b).abs().max() / a.abs().max()).item()
        t0, t1 = _time_pair(llama, acc, ids, args.rounds, args.steps)
        rows.append((f"Llama-style {args.layers}x{args.width} ({mparams(llama)}), {str(dtype)[6:]}",
                     "LlamaRMSNorm (HF)", "rmsnorm.accelerate", t0, t1,
                     f"max relative logit difference {err:.1e}; {len(rep.changed)} norms replaced"))

    lines = [f"Command: `python benchmarks/models.py --rounds {args.rounds} --steps {args.steps} --batch {args.batch} "
             f"--seq {args.seq} --layers {args.layers} --width {args.width}`", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {cpu_model()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, transformers {transformers.__version__}, allocator {allocator()}. Forward + "
             f"backward (loss = LM cross-entropy) of a batch of {args.batch} x {args.seq} tokens, random weights; "
             "median seconds per step over rounds in which the two models alternate.", "",
             "| model | before | after | before s/step | after s/step | change | check |",
             "|---|---|---|---|---|---|---|"]
    for name, before, after, t0, t1, note in rows:
        lines.append(f"| {name} | {before} | {after} | {t0:.3f} | {t1:.3f} | {100 * (t1 / t0 - 1):+.1f}% | {note} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text("# Whole-model step times on CPU\n\n" + text)


if __name__ == "__main__":
    main()
