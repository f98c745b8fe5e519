"""Presets: model sizes, steps and seeds per task.

- ``smoke``: the shipped data sample, tiny models, a few steps: seconds (tests, CI).
- ``quick`` (default): every task and variant end to end on the full data, one seed, small models:
  under 10 minutes on a 2-core CPU.
- ``full``: 3 seeds, larger models and more steps: about 2 hours on a 2-core CPU (1 h 44 min for the MT and
  image tasks, 15 min for retrieval; see docs/reproduction).
- ``paper``: closer to the paper's sizes, for a GPU (not run here).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class TaskSize:
    steps: int
    batch: int
    lr: float
    hidden: int  # GRU hidden / Transformer d_model / CNN first conv channels
    ffn: int = 0  # Transformer FFN / CNN second conv channels
    emb: int = 0
    heads: int = 4
    layers: int = 2
    vocab: int = 4000
    max_len: int = 40
    dropout: float = 0.1
    label_smoothing: float = 0.1
    warmup: int = 0
    eval_examples: int = 1500
    log_every: int = 10
    ckpt_every: int = 100


@dataclass(frozen=True)
class Preset:
    name: str
    data: str  # "full" or "sample"
    seeds: int
    tasks: dict[str, TaskSize] = field(default_factory=dict)
    timing_rounds: int = 5  # rounds of the interleaved timing phase
    timing_steps: int = 10  # steps per variant per round


PRESETS = {
    "smoke": Preset("smoke", "sample", 1, {
        "mt-gru": TaskSize(steps=6, batch=8, lr=2e-3, hidden=32, emb=16, vocab=300, max_len=16, eval_examples=8,
                           log_every=2, ckpt_every=3),
        "mt-transformer": TaskSize(steps=6, batch=8, lr=1e-3, hidden=32, ffn=64, heads=2, layers=1, vocab=300,
                                   max_len=16, warmup=2, eval_examples=8, log_every=2, ckpt_every=3),
        "image": TaskSize(steps=6, batch=16, lr=2e-3, hidden=8, ffn=8, eval_examples=50, log_every=2,
                          ckpt_every=3),
        "retrieval": TaskSize(steps=6, batch=8, lr=2e-3, hidden=32, ffn=32, emb=16, vocab=300, max_len=16,
                              eval_examples=8, log_every=2, ckpt_every=3),
    }, timing_rounds=2, timing_steps=1),
    "quick": Preset("quick", "full", 1, {
        "mt-gru": TaskSize(steps=100, batch=48, lr=2e-3, hidden=128, emb=96, vocab=4000, max_len=32,
                           eval_examples=200, ckpt_every=50),
        "mt-transformer": TaskSize(steps=120, batch=64, lr=1e-3, hidden=96, ffn=384, heads=4, layers=2,
                                   vocab=4000, max_len=32, warmup=40, dropout=0.0, eval_examples=200,
                                   ckpt_every=60),
        "image": TaskSize(steps=150, batch=64, lr=2e-3, hidden=16, ffn=32, eval_examples=2000, ckpt_every=50),
        "retrieval": TaskSize(steps=150, batch=64, lr=2e-3, hidden=128, ffn=128, emb=96, vocab=4000, max_len=32,
                              eval_examples=1000, ckpt_every=50),
    }, timing_rounds=3, timing_steps=5),
    "full": Preset("full", "full", 3, {
        "mt-gru": TaskSize(steps=400, batch=48, lr=2e-3, hidden=160, emb=96, vocab=4000, max_len=36,
                           eval_examples=500, ckpt_every=50),
        "mt-transformer": TaskSize(steps=600, batch=48, lr=2e-3, hidden=128, ffn=512, heads=4, layers=2,
                                   vocab=4000, max_len=32, warmup=100, dropout=0.1, eval_examples=500,
                                   ckpt_every=50),
        "image": TaskSize(steps=1000, batch=64, lr=2e-3, hidden=16, ffn=32, eval_examples=10000,
                          ckpt_every=100),
        "retrieval": TaskSize(steps=400, batch=64, lr=2e-3, hidden=160, ffn=128, emb=96, vocab=4000, max_len=32,
                              eval_examples=1000, ckpt_every=50),
    }, timing_rounds=5, timing_steps=10),
    "paper": Preset("paper", "full", 3, {
        "mt-gru": TaskSize(steps=20000, batch=80, lr=1e-3, hidden=512, emb=256, vocab=16000, max_len=64,
                           ckpt_every=1000, log_every=50),
        "mt-transformer": TaskSize(steps=20000, batch=128, lr=7e-4, hidden=512, ffn=2048, heads=8, layers=6,
                                   vocab=16000, max_len=64, warmup=4000, ckpt_every=1000, log_every=50),
        "image": TaskSize(steps=20000, batch=128, lr=1e-3, hidden=96, ffn=192, eval_examples=10000,
                          ckpt_every=1000, log_every=50),
        "retrieval": TaskSize(steps=20000, batch=128, lr=1e-3, hidden=1024, ffn=1024, emb=300, vocab=16000,
                              max_len=64, eval_examples=1000, ckpt_every=1000, log_every=50),
    }, timing_rounds=5, timing_steps=50),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def with_overrides(preset: Preset, seeds: int | None = None, steps: int | None = None) -> Preset:
    tasks = preset.tasks
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        tasks = {k: replace(v, steps=steps, ckpt_every=min(v.ckpt_every, steps)) for k, v in tasks.items()}
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    return replace(preset, seeds=seeds or preset.seeds, tasks=tasks)
