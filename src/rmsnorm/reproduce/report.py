"""Aggregate finished runs into results.json / results.csv, a Markdown report beside the paper, and figures."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from ..host import pyplot
from .atomic import atomic_file, atomic_json, atomic_text
from .norms import VARIANTS
from .paper import PAPER
from .tasks import TASK_TITLES, metric_of

MORE_METRICS = ("R@5", "R@10", "Es→En R@1", "Es→En R@5", "Es→En R@10", "median rank")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def collect(out: Path) -> dict:
    """{task: {variant: {...}}} from runs/*/*/seed*/result.json and timing/*.json."""
    table: dict = {}
    for path in sorted((out / "runs").glob("*/*/seed*/result.json")):
        r = json.loads(path.read_text())
        table.setdefault(r["task"], {}).setdefault(r["variant"], {"runs": []})["runs"].append(r)
    for path in sorted((out / "timing").glob("*.json")):
        t = json.loads(path.read_text())
        for v, secs in t["seconds_per_step"].items():
            table.setdefault(t["task"], {}).setdefault(v, {"runs": []})["timing"] = [1000 * s for s in secs]
    for task, variants in table.items():
        ln = variants.get("layernorm", {}).get("timing")
        for d in variants.values():
            runs = d["runs"]
            metric = metric_of(task) if runs and metric_of(task) in runs[0] else None
            d["metric"] = metric
            d["quality"] = _mean_std([r[metric] for r in runs]) if metric else (float("nan"), float("nan"))
            d["more"] = {k: _mean_std([r[k] for r in runs]) for k in MORE_METRICS if runs and k in runs[0]}
            d["seeds"] = len(runs)
            d["time_1k"] = _mean_std(d.get("timing", []))
            d["train_time_1k"] = _mean_std([r["seconds_per_1k_steps"] for r in runs])
            d["saved_vs_ln"] = (100 * (1 - d["time_1k"][0] / statistics.fmean(ln))
                                if ln and d.get("timing") else None)
    return table


def write_tables(out: Path, table: dict) -> None:
    rows = []
    for task in table:
        for v in VARIANTS:
            d = table[task].get(v)
            if d is None:
                continue
            rows.append({"task": task, "variant": v, "metric": d["metric"], "quality_mean": d["quality"][0],
                         "quality_std": d["quality"][1], "seeds": d["seeds"], "s_per_1k_steps_mean": d["time_1k"][0],
                         "s_per_1k_steps_std": d["time_1k"][1], "saved_vs_layernorm_pct": d["saved_vs_ln"],
                         "train_wall_s_per_1k_mean": d["train_time_1k"][0]})
    atomic_json(out / "results.json", {"rows": rows})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["task"])
    w.writeheader()
    w.writerows(rows)
    atomic_text(out / "results.csv", buf.getvalue())


def _fmt(m: float, s: float, digits: int = 1) -> str:
    if m != m:  # NaN
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(out: Path, table: dict, meta: dict) -> str:
    lines = [f"# Reproduction: {meta.get('preset', '?')} preset", "",
             f"Command: `{meta.get('command', 'rmsnorm reproduce')}`", "",
             f"Machine: {meta.get('machine', '?')}; {meta.get('threads', '?')} threads; torch "
             f"{meta.get('torch', '?')}; rmsnorm backend for our variants: {meta.get('backend', '?')}; "
             f"world size {meta.get('world_size', 1)}; allocator {meta.get('allocator', '?')}; started "
             f"{meta.get('started', '?')}.", "",
             "Quality: mean ± std over seeds. Time: seconds per 1k training steps (forward, backward, optimizer; "
             "no evaluation, no data loading), mean ± std over rounds of an interleaved timing phase in which "
             "the variants take turns on the same batches after warm-up. % saved is relative to LayerNorm.", ""]
    for task, variants in table.items():
        paper = PAPER.get(task, {})
        lines += [f"## {TASK_TITLES.get(task, task)}", "",
                  f"| variant | ours: {next(iter(variants.values()))['metric']} | ours: s / 1k steps | ours: % saved | "
                  f"seeds | paper: {paper.get('metric', '')} | paper: {paper.get('time_unit', '')} | paper: % saved |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in VARIANTS:
            d = variants.get(v)
            if d is None:
                continue
            pr = paper.get("rows", {}).get(v)
            saved = "–" if d["saved_vs_ln"] is None else f"{d['saved_vs_ln']:.1f}%"
            lines.append(f"| {v} | {_fmt(*d['quality'], 2)} | {_fmt(*d['time_1k'])} | {saved} | {d['seeds']} | "
                         f"{pr[0] if pr else '–'} | {pr[1] if pr else '–'} | "
                         f"{(str(pr[2]) + '%') if pr and pr[2] is not None else '–'} |")
        more = [k for k in MORE_METRICS if any(k in d.get("more", {}) for d in variants.values())]
        if more:
            lines += ["", "| variant | " + " | ".join(f"ours: {k}" for k in more) + " |",
                      "|---|" + "---|" * len(more)]
            lines += [f"| {v} | " + " | ".join(_fmt(*variants[v]["more"][k], 2) for k in more) + " |"
                      for v in VARIANTS if v in variants and variants[v].get("more")]
        trivial_path = out / "trivial" / f"{task}.json"
        trivial = json.loads(trivial_path.read_text()) if trivial_path.exists() else None
        if trivial:
            lines += ["", "Trivial baseline: " + ", ".join(f"{k} {v}" for k, v in trivial.items()) + "."]
        if paper:
            lines += ["", f"Paper: {paper['title']}. {paper.get('also', '')}"]
        fig = out / "figures" / f"{task}.png"
        if fig.exists():
            lines += ["", f"![{task} loss curves](figures/{task}.png)"]
        lines.append("")
    return "\n".join(lines) + "\n"


def figures(out: Path, table: dict) -> None:
    """Training loss against steps and against training wall time (the paper's Figure 1), mean over seeds."""
    plt = pyplot()
    if plt is None:
        return
    (out / "figures").mkdir(exist_ok=True)
    for task, variants in table.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for v in VARIANTS:
            runs = variants.get(v, {}).get("runs", [])
            if not runs:
                continue
            n = min(len(r["curve"]) for r in runs)
            if n == 0:
                continue
            steps = [runs[0]["curve"][i][0] for i in range(n)]
            secs = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(n)]
            loss = [statistics.fmean(r["curve"][i][2] for r in runs) for i in range(n)]
            axes[0].plot(steps, loss, label=v)
            axes[1].plot(secs, loss, label=v)
        axes[0].set_xlabel("training step")
        axes[1].set_xlabel("training wall time (s)")
        for ax in axes:
            ax.set_ylabel("training loss")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(TASK_TITLES.get(task, task), fontsize=10)
        fig.tight_layout()
        atomic_file(out / "figures" / f"{task}.png", lambda tmp, fig=fig: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)


def write_report(out: Path, meta: dict) -> Path:
    table = collect(out)
    if not table:
        return out / "report.md"
    write_tables(out, table)
    figures(out, table)
    atomic_text(out / "report.md", markdown(out, table, meta))
    return out / "report.md"
