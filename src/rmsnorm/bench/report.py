"""Reports from sweep rows: CSV, a Markdown table with ratios and the CPU targets checked, a PNG of GB/s against N."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from ..host import pyplot

OURS, P_VARIANT, LN, RMS, COMPILED = "rmsnorm", "rmsnorm p=0.0625", "torch.layer_norm", "torch.rms_norm", \
    "torch.compile(rms_norm)"


def load_jsonl(path: Path) -> tuple[dict, list[dict]]:
    meta, rows = {}, []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "meta":
            meta = rec
        else:
            rows.append(rec)
    return meta, rows


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        path.write_text("")
        return
    keys = list(rows[0])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in keys})


def _index(rows: list[dict]) -> dict:
    idx = {}
    for r in rows:
        idx[(r["provider"], r["m"], r["n"], r["dtype"], r["mode"])] = r
    return idx


def _ratio(idx, a, b, key) -> float | None:
    ra, rb = idx.get((a, *key)), idx.get((b, *key))
    if ra is None or rb is None:
        return None
    return ra["median_us"] / rb["median_us"]


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def markdown(meta: dict, rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("type") == "result"]
    idx = _index(rows)
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "roofline"]
    copy_rows = {(r["m"], r["n"], r["dtype"], r["mode"]): r for r in rows if r["provider"] == "roofline"}
    shapes = list(dict.fromkeys((r["m"], r["n"], r["dtype"]) for r in rows))
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    out = [
        f"Command: `{meta.get('command', '?')}`",
        "",
        f"Measured {meta.get('timestamp', '?')} on {meta.get('machine', '?')} ({meta.get('cores', '?')} cores), "
        f"{meta.get('threads', '?')} threads, allocator: {meta.get('allocator', '?')}, torch {meta.get('torch', '?')}, "
        f"python {meta.get('python', '?')}, git {meta.get('git', '?')}.",
        "",
        "Median of repeated samples after warm-up (each sample a batch of calls); effective GB/s with the "
        "convention fwd = 2·M·N·itemsize, bwd = 3·M·N·itemsize, fwd+bwd = 5·M·N·itemsize; "
        "% roofline = GB/s ÷ the GB/s of `x.clone()` (allocating read + write) of the same tensor, "
        "timed round-robin with the providers of each row (one sample of each per round), so drifts in "
        "the machine's speed hit all alike. Forward timings run under `torch.no_grad()`; backward and "
        "forward+backward go through autograd (dx and dW; LayerNorm also db).",
    ]
    for mode in modes:
        out += ["", f"### {mode}", "", "| M×N | dtype | " + " | ".join(providers) + " | ours/LN | ours/torch.rms_norm "
                "| ours/compile | copy GB/s |", "|---|---|" + "---|" * (len(providers) + 4)]
        for m, n, dt in shapes:
            key = (m, n, dt, mode)
            cells = []
            for p in providers:
                r = idx.get((p, *key))
                cells.append("–" if r is None else f"{r['median_us']:.1f} µs · {r['gbps']:.1f} GB/s · "
                             f"{r['pct_roofline']:.0f}%")
            copy = copy_rows.get((m, n, dt, mode))
            out.append(f"| {m}×{n} | {dt} | " + " | ".join(cells) + f" | {_fmt(_ratio(idx, OURS, LN, key))} | "
                       f"{_fmt(_ratio(idx, OURS, RMS, key))} | {_fmt(_ratio(idx, OURS, COMPILED, key))} | "
                       f"{_fmt(copy['gbps'] if copy else None, '.1f')} |")
    compiled = [r for r in rows if r["provider"] == COMPILED and r.get("first_call_s")]
    if compiled:
        out += ["", "torch.compile first-call time (compilation, excluded from the timings above): "
                + ", ".join(f"{r['m']}×{r['n']} {r['dtype']} {r['mode']} {r['first_call_s']:.1f} s"
                            for r in compiled) + "."]
    return "\n".join(out) + "\n"


def cpu_targets(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """The CPU targets of docs/benchmarks/cpu.md, checked from the rows: (target, met, evidence)."""
    from .sweep import TARGET_SHAPES as target_shapes

    rows = [r for r in rows if r.get("type") == "result"]
    idx = _index(rows)
    out = []

    def collect(a, b, modes, dtypes):
        vals = []
        for (m, n) in target_shapes:
            for dt in dtypes:
                for mode in modes:
                    r = _ratio(idx, a, b, (m, n, dt, mode))
                    if r is not None:
                        vals.append((f"{m}×{n} {dt} {mode}", r))
        return vals

    for dt, limit in (("float32", 1.0), ("bfloat16", 0.7)):
        vals = collect(OURS, LN, ("fwd", "fwd+bwd"), (dt,))
        if vals:
            worst = max(vals, key=lambda v: v[1])
            op = "<" if limit == 1.0 else "<="
            ok = all(v < limit if limit == 1.0 else v <= limit for _, v in vals)
            out.append((f"{dt}: fwd and fwd+bwd time / torch.layer_norm {op} {limit}", ok,
                        f"worst {worst[1]:.2f} ({worst[0]})"))
    vals = collect(RMS, OURS, ("fwd+bwd",), ("float32", "bfloat16"))
    if vals:
        worst = min(vals, key=lambda v: v[1])
        out.append(("fwd+bwd at least 4x faster than eager torch.rms_norm", all(v >= 4 for _, v in vals),
                    f"smallest speed-up {worst[1]:.1f}x ({worst[0]})"))
    vals = collect(OURS, COMPILED, ("fwd+bwd",), ("float32", "bfloat16"))
    if vals:
        worst = max(vals, key=lambda v: v[1])
        out.append(("fwd+bwd no slower than warm torch.compile(rms_norm)", all(v <= 1.0 for _, v in vals),
                    f"worst ratio {worst[1]:.2f} ({worst[0]})"))
    for mode, limit in (("fwd", 85.0), ("fwd+bwd", 75.0)):
        pcts = [(f"{r['m']}×{r['n']} {r['dtype']}", r["pct_roofline"]) for r in rows
                if r["provider"] == OURS and r["mode"] == mode and (r["m"], r["n"]) in target_shapes
                and r["m"] * r["n"] * (4 if r["dtype"] == "float32" else 2) >= 32 << 20]
        if pcts:
            worst = min(pcts, key=lambda v: v[1])
            out.append((f"{mode} >= {limit:.0f}% of the roofline on tensors of 32 MB or more",
                        all(v >= limit for _, v in pcts), f"lowest {worst[1]:.0f}% ({worst[0]})"))
    vals = collect(P_VARIANT, OURS, ("fwd", "fwd+bwd"), ("float32", "bfloat16"))
    if vals:
        worst = max(vals, key=lambda v: v[1])
        out.append(("partial p=0.0625 no slower than p=1", all(v <= 1.0 for _, v in vals),
                    f"worst ratio {worst[1]:.2f} ({worst[0]})"))
    r = _ratio(idx, OURS, LN, (64, 512, "float32", "fwd"))
    if r is not None:
        out.append(("per-call overhead: (64, 512) fp32 fwd within 1.2x of torch.layer_norm", r <= 1.2,
                    f"ratio {r:.2f}"))
    return out


def targets_markdown(targets: list[tuple[str, bool, str]]) -> str:
    lines = ["| target | met | measured |", "|---|---|---|"]
    lines += [f"| {b} | {'yes' if ok else '**no**'} | {ev} |" for b, ok, ev in targets]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str = "") -> bool:
    """GB/s against N per provider (fwd and fwd+bwd, one column per dtype); False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    rows = [r for r in rows if r.get("type") == "result" and r["m"] * r["n"] >= 1 << 18]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    if not dtypes or not modes:
        return False
    fig, axes = plt.subplots(len(modes), len(dtypes), figsize=(6 * len(dtypes), 4 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            series = defaultdict(list)
            for r in rows:
                if r["dtype"] != dt:
                    continue
                if r["mode"] != mode:
                    continue
                if r["provider"] == "roofline":
                    series["copy roofline"].append((r["n"], r["gbps"]))
                else:
                    series[r["provider"]].append((r["n"], r["gbps"]))
            for name, pts in series.items():
                pts = sorted(set(pts))
                style = "k--" if name == "copy roofline" else "o-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, markersize=4)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N (normalized size)")
            ax.set_ylabel("effective GB/s")
            ax.set_title(f"{mode}, {dt}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
