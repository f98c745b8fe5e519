"""Finished runs -> results.json / results.csv (raw data, paired comparisons, verdicts), report.md, figures.

results.json holds everything a verdict is computed from: every run's metrics by (task, variant, lr, seed),
the learning-rate choices, every timing round, the norm-level timing and the profiler shares; then the
comparisons (:mod:`rmsnorm.reproduce.stats`) and the verdicts on the paper's claims. The prose of report.md
is written from those verdicts, word for word.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from ..host import pyplot
from . import stats as S
from .atomic import atomic_file, atomic_json, atomic_text
from .lrgrid import GRID_EXTENSIONS
from .norms import TIMING_VARIANTS, VARIANTS
from .paper import PAPER
from .presets import DEV_LOSS_EXAMPLES
from .tasks import TASK_CLASSES, TASK_TITLES, TASKS, metric_of

MORE_METRICS = ("R@5", "R@10", "Es→En R@1", "Es→En R@5", "Es→En R@10", "median rank")
CLAIMS = {
    "C1": "RMSNorm's quality is comparable to LayerNorm's (at most the stated margin worse)",
    "C2": "RMSNorm takes 7%-64% less time than LayerNorm",
    "C3": "pRMSNorm's quality is comparable to RMSNorm's at lower cost",
}


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def collect(out: Path) -> dict:
    """The raw data of a run directory (see the module docstring)."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/lr*/seed*/result.json"))]
    for r in runs:
        r["loss_change_last_fifth_pct"] = _flatness(r.get("curve") or [])
        r["dev_loss_change_last_fifth_pct"] = _dev_change(r.get("dev_curve") or [], r.get("steps", 0))
        r.pop("curve", None), r.pop("size", None), r.pop("sample", None)
    lr = {p.stem: json.loads(p.read_text()) for p in sorted((out / "lr").glob("*.json"))}
    timing = {p.stem: json.loads(p.read_text()) for p in sorted((out / "timing").glob("*.json"))
              if p.stem != "norms" and not p.stem.endswith("-share")}
    shares = {p.stem.removesuffix("-share"): json.loads(p.read_text())
              for p in sorted((out / "timing").glob("*-share.json"))}
    trained_with = (_json(out / "meta.json") or {}).get("trained_with", {})
    return {"runs": runs, "lr": lr, "step_timing": timing, "norm_timing": _json(out / "timing" / "norms.json"),
            "norm_share": shares, "trained_with": trained_with}


def _flatness(curve: list) -> float | None:
    """Relative change (%) of the training loss over the last fifth of the steps: mean loss of the last tenth
    against the tenth before the last fifth (near 0: the loss is flat at the end)."""
    n = len(curve)
    if n < 10:
        return None
    tenth = max(1, n // 10)
    end = statistics.fmean(c[2] for c in curve[-tenth:])
    before = statistics.fmean(c[2] for c in curve[-2 * tenth - tenth:-2 * tenth])
    return 100 * (end - before) / before if before else None


CONVERGED_PCT = -1.0  # a run has converged when its held-out loss fell by less than this over the last fifth


def _dev_change(dev_curve: list, steps: int) -> float | None:
    """Relative change (%) of the held-out loss from the first measurement at or after 80% of the steps to the
    last one (near 0 or positive: converged, or past the best point; clearly negative: still improving)."""
    late = [c for c in dev_curve if c[0] >= 0.8 * steps]
    if len(late) < 2 or not late[0][1]:
        return None
    return 100 * (late[-1][1] - late[0][1]) / late[0][1]


def converged(run: dict) -> bool | None:
    """Whether a run's held-out loss was flat (or rising) over its last fifth; None without a dev curve."""
    change = run.get("dev_loss_change_last_fifth_pct")
    return None if change is None else change >= CONVERGED_PCT


def _chosen_runs(raw: dict, task: str, variant: str) -> list[dict]:
    """The variant's runs at its chosen lr (every seed)."""
    chosen = raw["lr"].get(task, {}).get(variant)
    return [r for r in raw["runs"] if r["task"] == task and r["variant"] == variant
            and (chosen is None or r["lr"] == chosen)]


def _final(raw: dict, task: str, variant: str) -> dict[int, float]:
    """seed -> headline metric of the variant's runs at its chosen lr."""
    metric = metric_of(task)
    return {r["seed"]: r[metric] for r in _chosen_runs(raw, task, variant) if metric in r}


def _paired(a: dict[int, float], b: dict[int, float]) -> tuple[list[float], list[float]]:
    seeds = sorted(set(a) & set(b))
    return [a[s] for s in seeds], [b[s] for s in seeds]


def _time_comparison(claim: str, kind: str, task: str, setting: str, ours: str, ref: str, a: list[float],
                     b: list[float]) -> dict:
    """One round-paired time comparison: C2 judges the saving against the paper's 7%, C3 "faster"."""
    r = S.time_ratio(a, b)
    verdict = S.saves_claimed_time(r) if claim == "C2" else S.faster(r)
    return {"claim": claim, "kind": kind, "task": task, "setting": setting, "ours": ours, "reference": ref,
            "ratio": r.as_dict(), "saving_pct": S.saving_pct(r).as_dict(), "verdict": verdict}


def analyse(raw: dict) -> dict:
    """Comparisons and verdicts from raw data alone (what a reader can recompute from results.json)."""
    comps: list[dict] = []
    tasks = [t for t in TASKS if any(r["task"] == t for r in raw["runs"])]
    for task in tasks:
        metric = metric_of(task)
        margin = S.MARGINS[metric]
        for claim, ours, ref in (("C1", "rmsnorm", "layernorm"), ("C3", "prmsnorm", "rmsnorm")):
            a, b = _paired(_final(raw, task, ours), _final(raw, task, ref))
            if not a:
                continue
            h = S.harm(metric, a, b)
            flags = [converged(r) for v in (ours, ref) for r in _chosen_runs(raw, task, v)]
            comps.append({"claim": claim, "kind": "quality", "task": task, "ours": ours, "reference": ref,
                          "metric": metric, "margin": margin, "ours_values": a, "reference_values": b,
                          "worse_by": h.as_dict(), "verdict": S.non_inferior(h, margin),
                          "runs_converged": (f"{sum(f is True for f in flags)}/{len(flags)}"
                                             if any(f is not None for f in flags) else None)})
    for task, t in raw["step_timing"].items():
        secs = t["seconds_per_step"]
        for setting, suffix in (("fused", ""), ("unfused", "-ops")):
            for claim, ours, ref in (("C2", "rmsnorm", "layernorm"), ("C3", "prmsnorm", "rmsnorm")):
                a, b = secs.get(ours + suffix), secs.get(ref + suffix)
                if not a or not b:
                    continue
                comps.append(_time_comparison(claim, "step time", task, setting, ours, ref, a, b))
    nt = raw.get("norm_timing")
    if nt:
        for shape in nt["shapes"]:
            for setting in ("unfused", "fused"):
                for claim, ours, ref in (("C2", "rmsnorm", "layernorm"), ("C3", "prmsnorm", "rmsnorm")):
                    a, b = nt["seconds"][f"{shape}/{setting}/{ours}"], nt["seconds"][f"{shape}/{setting}/{ref}"]
                    comps.append(_time_comparison(claim, "norm time", shape, setting, ours, ref, a, b))
    verdicts = {}
    for claim in CLAIMS:
        mine = [c for c in comps if c["claim"] == claim]
        by_kind: dict[str, list[str]] = {}
        for c in mine:
            label = c["kind"] + (f" ({c['setting']})" if c.get("setting") else "")
            by_kind.setdefault(label, []).append(c["verdict"])
        if claim == "C3":  # quality and time of the same task combine; norm-level time stands alone
            for c in mine:
                if c["kind"] == "quality":
                    times = [d["verdict"] for d in mine if d["kind"] == "step time" and d["task"] == c["task"]
                             and d.get("setting") == "fused"]
                    c["combined_with_fused_step_time"] = S.combine(c["verdict"], *times) if times else None
        verdicts[claim] = {"statement": CLAIMS[claim],
                           "by_kind": {k: {"verdict": S.summary(v), "counts": S.counts(v)}
                                       for k, v in by_kind.items()},
                           "overall": S.summary([c["verdict"] for c in mine]),
                           "counts": S.counts([c["verdict"] for c in mine])}
    convergence = {}
    for task in tasks:
        flags = [converged(r) for v in VARIANTS for r in _chosen_runs(raw, task, v)]
        convergence[task] = {"runs": len(flags), "converged": sum(f is True for f in flags),
                             "measured": sum(f is not None for f in flags)}
    return {"comparisons": comps, "verdicts": verdicts, "convergence": convergence}


def _rows(raw: dict) -> list[dict]:
    """One row per (task, variant): the summary table of results.csv."""
    rows = []
    for task in TASKS:
        timing = raw["step_timing"].get(task, {}).get("seconds_per_step", {})
        for v in (*VARIANTS, *TIMING_VARIANTS):
            vals = list(_final(raw, task, v).values())
            t = timing.get(v)
            if not vals and not t:
                continue
            chosen = raw["lr"].get(task, {}).get(v)
            mine = _chosen_runs(raw, task, v) if vals else []
            flat = [r["loss_change_last_fifth_pct"] for r in mine if r.get("loss_change_last_fifth_pct") is not None]
            dev = [r["dev_loss_change_last_fifth_pct"] for r in mine
                   if r.get("dev_loss_change_last_fifth_pct") is not None]
            rows.append({"task": task, "variant": v, "metric": metric_of(task) if vals else None,
                         "lr": chosen, "seeds": len(vals),
                         "quality_mean": statistics.fmean(vals) if vals else None,
                         "quality_std": statistics.stdev(vals) if len(vals) > 1 else None,
                         "loss_change_last_fifth_pct": statistics.fmean(flat) if flat else None,
                         "dev_loss_change_last_fifth_pct": statistics.fmean(dev) if dev else None,
                         "runs_converged": (sum(converged(r) is True for r in mine) if dev else None),
                         "ms_per_step_median": 1000 * statistics.median(t) if t else None})
    return rows


def _ci(iv: dict, digits: int = 2, pct: bool = False) -> str:
    unit = "%" if pct else ""
    if iv["n"] < 2 or iv["lo"] is None:
        return f"{iv['mean']:.{digits}f}{unit} (n = {iv['n']}, no CI)"
    return f"{iv['mean']:+.{digits}f}{unit} [{iv['lo']:+.{digits}f}, {iv['hi']:+.{digits}f}]"


def markdown(out: Path, raw: dict, analysis: dict, meta: dict) -> str:
    v = analysis["verdicts"]
    lines = [f"# Reproduction: {meta.get('preset', '?')} preset", "",
             f"Command: `{meta.get('command', 'rmsnorm reproduce')}`", "",
             f"Machine: {meta.get('machine', '?')}; {meta.get('threads', '?')} threads; torch "
             f"{meta.get('torch', '?')}; rmsnorm backend: {meta.get('backend', '?')}; world size "
             f"{meta.get('world_size', 1)}; allocator {meta.get('allocator', '?')}; started "
             f"{meta.get('started', '?')}.",
             "", "## Verdicts", "",
             "Computed by code from the raw data in results.json (rmsnorm/reproduce/stats.py): seed-paired "
             "quality differences with a 95% Student-t CI; round-paired time ratios as the 20%-trimmed mean "
             "of the log ratios with its 95% Tukey-McLaughlin CI (timing noise has heavy tails). Quality: "
             "non-inferiority within a margin fixed in advance (" +
             ", ".join(f"{m} {d:g}" for m, d in S.MARGINS.items()) + "). Time: supported when the whole CI "
             "of the saving is at or above 7%, contradicted when it is entirely below.", "",
             "| claim | overall | by kind of comparison |", "|---|---|---|"]
    for claim, d in v.items():
        kinds = "; ".join(f"{k}: {x['verdict']} ({x['counts']})" for k, x in d["by_kind"].items()) or "not measured"
        lines.append(f"| {claim}: {d['statement']} | **{d['overall']}** ({d['counts']}) | {kinds} |")
    lines.append("")
    conv = analysis.get("convergence") or {}
    if any(c["measured"] for c in conv.values()):
        lines += ["Training runs converged (held-out loss flat or rising over the last fifth; the runs the "
                  "comparisons use, every variant and seed): " + ", ".join(
                      f"{t} {c['converged']}/{c['runs']}" for t, c in conv.items()) + ".", ""]
    comps = analysis["comparisons"]
    quality = [c for c in comps if c["kind"] == "quality"]
    if quality:
        lines += ["## Quality (paired by seed)", "",
                  "How much worse `ours` is than the reference in the task's metric (negative: better), with its "
                  "95% CI, and the verdict of \"at most the margin worse\".", "",
                  "| claim | task | ours vs reference | ours | reference | worse by | margin | verdict | "
                  "runs converged |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in quality:
            extra = (f" (with fused step time: {c['combined_with_fused_step_time']})"
                     if c.get("combined_with_fused_step_time") else "")
            lines.append(f"| {c['claim']} | {c['task']} | {c['ours']} vs {c['reference']} | "
                         f"{statistics.fmean(c['ours_values']):.2f} | {statistics.fmean(c['reference_values']):.2f} | "
                         f"{_ci(c['worse_by'])} | {c['margin']:g} | {c['verdict']}{extra} | "
                         f"{c.get('runs_converged') or '–'} |")
        lines += ["", f"Runs converged: of the compared runs, those whose held-out (dev) loss fell by less than "
                  f"{-CONVERGED_PCT:g}% over the last fifth of training (flat, or rising past its best point).", ""]
    nt = [c for c in comps if c["kind"] == "norm time"]
    if nt:
        t = raw["norm_timing"]
        lines += ["## Norm-level time (forward + backward, paired by round)", "",
                  f"Each norm alone at the tasks' shapes (rows x N, gain and bias with gradients), {t['rounds']} "
                  "interleaved rounds. unfused: the norm written as framework ops, as the paper's 2019 code; "
                  "fused: F.layer_norm and this library's kernels. Time saved = 1 - t(ours) / t(reference).", "",
                  "| shape (rows x N) | setting | ours vs reference | time saved, 95% CI | verdict |",
                  "|---|---|---|---|---|"]
        for c in nt:
            m, n = t["shapes"][c["task"]]
            lines.append(f"| {c['task']} ({m} x {n}) | {c['setting']} | {c['ours']} vs {c['reference']} | "
                         f"{_ci(c['saving_pct'], 1, True)} | {c['claim']}: {c['verdict']} |")
        lines.append("")
    st = [c for c in comps if c["kind"] == "step time"]
    if st:
        lines += ["## Training-step time (paired by round)", "",
                  "Forward, backward and optimizer of the whole model, the variants taking turns on the same batches; "
                  "unfused: the same models with the norms written as framework ops.", "",
                  "| task | setting | ours vs reference | time saved, 95% CI | rounds | verdict |",
                  "|---|---|---|---|---|---|"]
        for c in st:
            lines.append(f"| {c['task']} | {c['setting']} | {c['ours']} vs {c['reference']} | "
                         f"{_ci(c['saving_pct'], 1, True)} | {c['ratio']['n']} | {c['claim']}: {c['verdict']} |")
        lines.append("")
    shares = raw.get("norm_share") or {}
    if shares:
        lines += ["## How much of a step the norm is (profiler)", "",
                  "Share of a LayerNorm model's training step spent in LayerNorm forward and backward (torch.profiler "
                  "self CPU time), and the most any faster norm could save of the step (Amdahl): share x the "
                  "fused norm-level saving at the task's shape.", "",
                  "| task | LayerNorm share of the step | fused RMSNorm norm-level saving | step saving bound |",
                  "|---|---|---|---|"]
        for task, s in shares.items():
            sav = [c["saving_pct"]["mean"] for c in nt if c["task"].startswith(task + ":") and c["setting"] == "fused"
                   and c["ours"] == "rmsnorm"]
            bound = f"{s['norm_share'] * statistics.fmean(sav):.1f}%" if sav else "–"
            best = f"{statistics.fmean(sav):.1f}%" if sav else "–"
            lines.append(f"| {task} | {100 * s['norm_share']:.1f}% | {best} | {bound} |")
        lines.append("")
    lines += _task_sections(out, raw)
    return "\n".join(lines) + "\n"


def _evaluated_on(raw: dict, task: str) -> list[str]:
    """How many held-out examples the task's numbers rest on: test, dev, and the held-out loss curve's."""
    runs = [r for r in raw["runs"] if r["task"] == task]
    test = sorted({r["examples"] for r in runs if "examples" in r})
    dev = sorted({r["dev"]["examples"] for r in runs if "examples" in r.get("dev", {})})
    if not test:
        return []
    unit = "images" if TASK_CLASSES[task].dataset == "fashion" else "verse pairs"
    text = f"Evaluated on {'/'.join(map(str, test))} test {unit}"
    if dev:
        curve = raw.get("trained_with", {}).get(task, {}).get("dev_loss_examples", DEV_LOSS_EXAMPLES)
        text += (f"; learning rates chosen on {'/'.join(map(str, dev))} dev {unit}, the held-out loss measured on "
                 f"{min(curve, dev[0])} of them")
    return ["", text + "."]


def _task_sections(out: Path, raw: dict) -> list[str]:
    lines: list[str] = []
    rows = _rows(raw)
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task and r["seeds"]]
        if not mine:
            continue
        paper = PAPER.get(task, {})
        lines += [f"## {TASK_TITLES.get(task, task)}", "",
                  f"| variant | lr | seeds | {metric_of(task)} mean ± std | loss change, last fifth | held-out loss "
                  f"change, last fifth | runs converged | ms / step (median) | paper: {paper.get('metric', '–')} | "
                  f"paper: {paper.get('time_unit', 'time')} |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            pr = paper.get("rows", {}).get(r["variant"])
            std = f" ± {r['quality_std']:.2f}" if r["quality_std"] is not None else ""
            ms = f"{r['ms_per_step_median']:.1f}" if r["ms_per_step_median"] else "–"
            flat, dev = r["loss_change_last_fifth_pct"], r.get("dev_loss_change_last_fifth_pct")
            pct = lambda x: f"{x:+.1f}%" if x is not None else "–"
            conv = "–" if r.get("runs_converged") is None else f"{r['runs_converged']}/{r['seeds']}"
            lines.append(f"| {r['variant']} | {r['lr'] if r['lr'] is not None else '–'} | {r['seeds']} | "
                         f"{r['quality_mean']:.2f}{std} | {pct(flat)} | {pct(dev)} | {conv} | {ms} | "
                         f"{pr[0] if pr else '–'} | {pr[1] if pr else '–'} |")
        lines += ["", "Loss change over the last fifth of training: the mean training loss of the last tenth of "
                  "the steps against the tenth before the last fifth; held-out loss change: the dev split's loss "
                  "(no dropout) at the end against its value at 80% of the steps; both means over seeds. A run "
                  f"counts as converged when its held-out loss fell by less than {-CONVERGED_PCT:g}% over that "
                  "last fifth (a training loss can keep falling by memorizing the training set)."]
        lines += _evaluated_on(raw, task)
        grid = [r for r in raw["runs"] if r["task"] == task and "dev" in r]
        if grid:
            metric = metric_of(task)
            chosen = raw["lr"].get(task, {})
            by_variant = {v: sorted((r for r in grid if r["variant"] == v), key=lambda r: r["lr"]) for v in VARIANTS}
            edge = [v for v, rs in by_variant.items() if chosen.get(v) is not None and len(rs) > 1
                    and chosen[v] in (rs[0]["lr"], rs[-1]["lr"])]
            lines += ["", "Learning rate per variant, chosen on the dev split (seed 0; a variant's grid grows by "
                      f"up to {GRID_EXTENSIONS} rates beyond an end where its best rate is there): " + "; ".join(
                          f"{v}: " + ", ".join(f"{r['lr']:g} → {r['dev'][metric]}" for r in rs)
                          for v, rs in by_variant.items() if rs) + "."
                      + (f" Still at an end of its grid ({', '.join(edge)}): a wider grid might find a better "
                         "rate there." if edge else "")]
        trivial = _json(out / "trivial" / f"{task}.json")
        if trivial:
            lines += ["", "Trivial baseline: " + ", ".join(f"{k} {val}" for k, val in trivial.items()) + "."]
        if paper:
            lines += ["", f"Paper: {paper['title']}. {paper.get('also', '')}"]
        if (out / "figures" / f"{task}.png").exists():
            lines += ["", f"![{task} loss curves](figures/{task}.png)"]
        lines.append("")
    return lines


def figures(out: Path, raw_runs: list[dict]) -> None:
    """Training loss against steps and against training wall time (the paper's Figure 1), mean over seeds."""
    plt = pyplot()
    if plt is None:
        return
    (out / "figures").mkdir(exist_ok=True)
    by_task: dict[str, dict[str, list[dict]]] = {}
    for r in raw_runs:
        by_task.setdefault(r["task"], {}).setdefault(r["variant"], []).append(r)
    for task, variants in by_task.items():
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for v, runs in variants.items():
            n = min(len(r["curve"]) for r in runs)
            if n == 0:
                continue
            steps = [runs[0]["curve"][i][0] for i in range(n)]
            secs = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(n)]
            loss = [statistics.fmean(r["curve"][i][2] for r in runs) for i in range(n)]
            axes[0].plot(steps, loss, label=v)
            axes[1].plot(secs, loss, label=v)
            k = min(len(r.get("dev_curve") or []) for r in runs)
            if k:
                axes[2].plot([runs[0]["dev_curve"][i][0] for i in range(k)],
                             [statistics.fmean(r["dev_curve"][i][1] for r in runs) for i in range(k)], label=v)
        axes[0].set_xlabel("training step")
        axes[1].set_xlabel("training wall time (s)")
        axes[2].set_xlabel("training step")
        for ax, what in zip(axes, ("training loss", "training loss", "held-out (dev) loss")):
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(TASK_TITLES.get(task, task), fontsize=10)
        fig.tight_layout()
        def save(tmp: Path, fig=fig) -> None:
            fig.savefig(tmp, dpi=100, format="png")

        atomic_file(out / "figures" / f"{task}.png", save)
        plt.close(fig)


def _clean(obj):
    """JSON without NaN / inf (null instead)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def write_report(out: Path, meta: dict) -> Path:
    raw = collect(out)
    if not raw["runs"] and not raw["norm_timing"]:
        return out / "report.md"
    analysis = analyse(raw)
    rows = _rows(raw)
    atomic_json(out / "results.json", _clean({"meta": meta, "raw": raw, **analysis, "rows": rows}))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["task"])
    w.writeheader()
    w.writerows(rows)
    atomic_text(out / "results.csv", buf.getvalue())
    curves = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/lr*/seed*/result.json"))]
    chosen = raw["lr"]
    figures(out, [r for r in curves if chosen.get(r["task"], {}).get(r["variant"], r["lr"]) == r["lr"]])
    atomic_text(out / "report.md", markdown(out, raw, analysis, meta))
    return out / "report.md"
