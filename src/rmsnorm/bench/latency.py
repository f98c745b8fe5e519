"""``rmsnorm bench --latency``: per-call cost on small shapes (LLM decode, small models), where the call
path, not memory, decides.

Each cell times, round-robin in one run, the ``rmsnorm.RMSNorm`` module call, the functional
``rmsnorm.rms_norm``, the ``nn.LayerNorm`` module call and ``F.layer_norm`` (with bias, as nn.LayerNorm
runs), in three modes: no_grad forward, grad-mode forward (inputs require grad, nothing backward) and
forward+backward; every time is reported with its ratio to ``F.layer_norm``'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .timing import measure_group

SHAPES = [(1, 4096), (8, 4096), (64, 480), (64, 512)]
MODES = ("no_grad", "grad fwd", "fwd+bwd")
PROVIDERS = ("RMSNorm module", "rms_norm", "nn.LayerNorm", "F.layer_norm")


def _callables(m: int, n: int, dtype: torch.dtype, mode: str) -> dict:
    import rmsnorm

    g = torch.Generator().manual_seed(m * 31 + n)
    x = torch.randn(m, n, generator=g).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    ours = rmsnorm.RMSNorm(n, eps=1e-6, dtype=dtype)
    theirs = nn.LayerNorm(n, eps=1e-6, dtype=dtype)
    w, b = ours.weight, theirs.bias
    fns = {"RMSNorm module": lambda a: ours(a), "rms_norm": lambda a: rmsnorm.rms_norm(a, w, eps=1e-6),
           "nn.LayerNorm": lambda a: theirs(a), "F.layer_norm": lambda a: F.layer_norm(a, (n,), theirs.weight, b, 1e-6)}
    if mode == "no_grad":
        def call(f):
            def run():
                with torch.no_grad():
                    return f(x)
            return run
    elif mode == "grad fwd":
        xg = x.clone().requires_grad_(True)

        def call(f):
            return lambda: f(xg)
    else:
        xg = x.clone().requires_grad_(True)

        def call(f):
            return lambda: f(xg).backward(dy)
    return {name: call(f) for name, f in fns.items()}


def run(out: Path, dtypes: list[torch.dtype], threads: tuple[int, ...] = (1, 2)) -> list[dict]:
    """Time every cell; write ``latency.jsonl`` and ``latency.md`` under ``out``; return the rows."""
    rows = []
    before = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for m, n in SHAPES:
                for dtype in dtypes:
                    for mode in MODES:
                        timings = measure_group(_callables(m, n, dtype, mode), samples=15, budget_s=0.15)
                        base = timings["F.layer_norm"].median_s
                        for name, tm in timings.items():
                            rows.append({"threads": t, "m": m, "n": n, "dtype": str(dtype).removeprefix("torch."),
                                         "mode": mode, "provider": name, "median_us": tm.median_s * 1e6,
                                         "p10_us": tm.p10_s * 1e6, "p90_us": tm.p90_s * 1e6,
                                         "ratio_to_layer_norm": tm.median_s / base})
    finally:
        torch.set_num_threads(before)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "latency.md").write_text(markdown(rows))
    return rows


def markdown(rows: list[dict]) -> str:
    idx = {(r["threads"], r["m"], r["n"], r["dtype"], r["mode"], r["provider"]): r for r in rows}
    head = "| threads | M×N | dtype | mode | " + " | ".join(f"{p} µs (× F.layer_norm)" for p in PROVIDERS) + " |"
    lines = [head, "|" + "---|" * (4 + len(PROVIDERS))]
    for t, m, n, dt, mode in dict.fromkeys((r["threads"], r["m"], r["n"], r["dtype"], r["mode"]) for r in rows):
        cells = []
        for p in PROVIDERS:
            r = idx[(t, m, n, dt, mode, p)]
            cells.append(f"{r['median_us']:.1f}" if p == "F.layer_norm" else
                         f"{r['median_us']:.1f} ({r['ratio_to_layer_norm']:.2f})")
        lines.append(f"| {t} | {m}×{n} | {dt} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
