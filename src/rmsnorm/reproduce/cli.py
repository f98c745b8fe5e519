"""``rmsnorm reproduce``: train every task x variant x seed, time the variants, write the report."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..cli_args import (
    UsageError,
    backend_name,
    choices_list,
    device,
    output_dir,
    positive_int,
    run_command,
    writable_dir,
)
from ..host import allocator, command_line, cpu_model, rerun_under_tcmalloc
from ..spec import plain
from .lrgrid import GRID_EXTENSIONS, choose_lrs
from .norms import TIMING_VARIANTS, VARIANTS, check_variants
from .presets import PRESETS, get_preset, task_sizes, with_overrides
from .tasks import TASKS, check_tasks, norm_shapes


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's experiments at small scale on real data",
                       description="Trains each task with every normalization variant, times the variants, and "
                                   "writes results.json/csv, report.md and figures beside the paper's numbers.")
    p.add_argument("--preset", default="quick", choices=list(PRESETS), help=f"one of {', '.join(PRESETS)} "
                   "(default quick)")
    p.add_argument("--tasks", type=choices_list(TASKS, "task"), default=None,
                   help=f"comma list of {', '.join(TASKS)} (default: the preset's)")
    p.add_argument("--variants", type=choices_list(VARIANTS, "variant"), default=",".join(VARIANTS),
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=positive_int, default=None, help="number of seeds (default: the preset's)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps of every run (default: the preset's)")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda")
    p.add_argument("--backend", type=backend_name, default=None,
                   help="rmsnorm backend for the rmsnorm variants (default: automatic)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="training runs at once, each in its own process with threads/jobs threads (CPU, one "
                        "process; default: the preset's, 2 for full, capped at the threads). Timing phases "
                        "always run alone")
    p.add_argument("--out", type=writable_dir, default=None,
                   help="output directory (default runs/reproduce-<preset>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress targets")
    p.add_argument("--allocator", choices=["auto", "current", "tcmalloc"], default="auto",
                   help="auto (default): re-run under tcmalloc when it is installed and this is not a torchrun "
                        "job, so no variant's timing pays glibc's page faults; the report says which was used")
    p.set_defaults(fn=main)


def _maybe_tcmalloc(choice: str) -> None:
    """Re-run this command under tcmalloc (only from the console script, where argv is the command)."""
    if choice == "current" or sys.argv[1:2] != ["reproduce"]:
        return
    if choice == "auto" and "WORLD_SIZE" in os.environ:  # torchrun: every rank keeps its allocator
        return
    rerun_under_tcmalloc("reproduce", required=choice == "tcmalloc")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _listed(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [t.strip() for t in value.split(",") if t.strip()]


def main(args: argparse.Namespace) -> int:
    """The command; a bad value is one line on stderr and exit status 2."""
    return run_command("rmsnorm reproduce", _main, args)


def _main(args: argparse.Namespace) -> int:
    from .runner import finished

    try:
        preset = with_overrides(get_preset(args.preset), args.seeds, args.steps)
        tasks = check_tasks(_listed(args.tasks) if args.tasks else list(preset.default_tasks or preset.tasks))
        variants = check_variants(_listed(args.variants))
        missing = [t for t in tasks if t not in preset.tasks]
        if missing:
            raise ValueError(f"the {preset.name} preset has no size for {missing}; its tasks: "
                             f"{', '.join(preset.tasks)}")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    variants = [v for v in variants if v in VARIANTS]  # the timing-only variants are added by the timing phase
    if not _importable("numpy") or (any(t.startswith("mt") or t == "retrieval" for t in tasks)
                                    and not (_importable("sacrebleu") and _importable("tokenizers"))):
        raise UsageError("the experiments need numpy, sacrebleu and tokenizers: install the experiments extra "
                         "(pip install 'rmsnorm[experiments]')")
    out = args.out or Path("runs") / f"reproduce-{preset.name}"
    if not args.dry_run:
        out = output_dir(out)  # a plan shows where it would write, and creates nothing
    if args.threads:
        torch.set_num_threads(args.threads)
    single_cpu = args.device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) == 1
    jobs = getattr(args, "jobs", None)
    if jobs is None:  # the preset's default where it can apply
        jobs = min(preset.jobs, torch.get_num_threads()) if single_cpu else 1
    if jobs > 1 and not single_cpu:
        raise UsageError("--jobs runs several CPU training runs at once in one process tree; it cannot be "
                         "combined with --device cuda or torchrun")
    if jobs > torch.get_num_threads():
        raise UsageError(f"--jobs {jobs} is more than the {torch.get_num_threads()} threads torch uses here "
                         "(every run needs at least one)")
    runs = [(t, v, s, lr) for t in tasks for v in variants for s, lr in _schedule(preset.tasks[t], preset.seeds)]
    backend = args.backend or _auto_backend(args.device)
    trained = {t: _trained_with(preset, t, args.device, backend) for t in tasks}
    old = _read_meta(out)
    _check_folder(out, old, trained)  # before anything is written (a plan says so too)
    if args.dry_run:
        print(f"preset {preset.name} ({preset.data} data), {preset.seeds} seed(s), output {out}")
        print(f"  norm-level timing at every task's shapes, fused and unfused: up to {preset.norm_timing_s:.0f} s")
        for t in tasks:
            size = preset.tasks[t]
            grid = (f", lr chosen per variant from {list(size.lrs)} on the dev split (up to {GRID_EXTENSIONS} more "
                    "beyond an end where a variant's best is there)" if size.lrs else "")
            print(f"  {t}: {len(variants)} variants x {preset.seeds} seeds x {size.steps} steps (batch {size.batch})"
                  f"{grid}, then at least {preset.timing_rounds} timing rounds x {preset.timing_steps} steps")
        done = sum(finished(out, t, v, s, lr) for t, v, s, lr in runs)
        most = len(runs) + sum(GRID_EXTENSIONS * len(variants) for t in tasks if preset.tasks[t].lrs)
        print(f"  at most {most} training runs, {done} already finished (they are not trained again); "
              f"{jobs} at a time, {torch.get_num_threads() // jobs} thread(s) each")
        return 0
    _maybe_tcmalloc(getattr(args, "allocator", "current"))
    from . import report
    from .atomic import atomic_json
    from .data import DataMissing
    from .normtime import time_norms
    from .runner import Dist, norm_share, run_dir, time_variants, train_run
    from .tasks import make_task

    dd = Dist(args.device)
    meta = {"preset": preset.name, "command": command_line("reproduce"),
            "machine": cpu_model() if args.device == "cpu" else torch.cuda.get_device_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "backend": backend, "world_size": dd.world, "allocator": allocator(),
            "started": time.strftime("%Y-%m-%d %H:%M %Z"), "tasks": tasks, "variants": variants, "jobs": jobs,
            "threads_per_run": torch.get_num_threads() // jobs}
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_json(out / "meta.json", {**meta, "preset_config": {**old.get("preset_config", {}),
                                                                  **{t: asdict(preset.tasks[t]) for t in tasks}},
                                        "trained_with": {**old.get("trained_with", {}), **trained}})
    total = sum(preset.tasks[t].steps for t, v, s, lr in runs if not finished(out, t, v, s, lr))
    bar = _bar(total, args.no_progress or not dd.main)
    t_start = time.time()
    pool = None
    if jobs > 1:
        from .pool import RunPool

        pool = RunPool(jobs, torch.get_num_threads() // jobs)
    try:
        built = {}
        for t in tasks:  # data first: a missing data set is reported before anything runs
            try:
                built[t] = make_task(t, preset.tasks[t], preset.data, out / "work")
            except DataMissing as exc:
                print(f"rmsnorm reproduce: {exc}", file=sys.stderr)
                return 3
        if dd.main and not (out / "timing" / "norms.json").exists():
            bar.set_description("norm-level timing")
            shapes = _norm_shapes(preset)
            dtype = getattr(torch, preset.autocast) if preset.autocast and args.device != "cpu" else torch.float32
            res = time_norms(shapes, preset.norm_timing_s, args.device, args.backend, dtype=dtype)
            atomic_json(out / "timing" / "norms.json", res)
            report.write_report(out, meta)
        for t in tasks:
            task = built[t]
            if dd.main:
                atomic_json(out / "trivial" / f"{t}.json", task.trivial_baseline())
            size = preset.tasks[t]

            def train(v: str, s: int, lr: float, dev_split: bool = False, t: str = t, task=task) -> dict:
                done = finished(out, t, v, s, lr)
                if not done:
                    bar.set_description(f"{t} {v} lr{lr:g} seed{s}")
                res = train_run(task, v, s, lr, run_dir(out, t, v, s, lr), args.device, args.backend, dd,
                                on_step=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")),
                                dev_split=dev_split, amp=preset.autocast)
                if dd.main and not done:
                    bar.write(_result_line(t, v, s, lr, res, task.metric))
                return res

            def train_all(runs: list[tuple[str, int, float, bool]], t: str = t, task=task, size=size) -> dict:
                """(variant, seed, lr) -> result of every (variant, seed, lr, dev_split): in order here, or on
                the pool (finished runs are read here either way)."""
                if pool is None:
                    return {(v, s, lr): train(v, s, lr, dev_split) for v, s, lr, dev_split in runs}
                got = {(v, s, lr): train(v, s, lr, dev_split) for v, s, lr, dev_split in runs
                       if finished(out, t, v, s, lr)}

                def done(key: tuple[str, int, float], res: dict) -> None:
                    bar.update(size.steps)
                    bar.write(f"{_result_line(t, *key, res, task.metric)} ({pool.threads} thread(s), "
                              f"{pool.jobs} runs at once)")

                bar.set_description(f"{t}: {pool.jobs} runs at once")
                return {**got, **pool.train(t, size, preset.data, out / "work",
                                            [r for r in runs if r[:3] not in got],
                                            lambda v, s, lr: run_dir(out, t, v, s, lr), args.backend,
                                            preset.autocast, done)}

            chosen = {}
            if size.lrs:
                chosen = choose_lrs(size.lrs, variants, task.metric, train_all)
            else:
                chosen = {v: size.lr for v in variants}
            if dd.main:
                atomic_json(out / "lr" / f"{t}.json", {v: chosen[v] for v in variants})
            if pool is None:
                for s in range(preset.seeds):
                    for v in variants:
                        train(v, s, chosen[v])
                    if dd.main:
                        report.write_report(out, meta)
            else:
                train_all([(v, s, chosen[v], False) for s in range(preset.seeds) for v in variants])
                report.write_report(out, meta)
            if dd.main:
                bar.set_description(f"{t} timing")
                timed = variants + [v for v in TIMING_VARIANTS if v.removesuffix("-ops") in variants]
                pairs = tuple((a, b) for a, b in (("rmsnorm", "layernorm"), ("prmsnorm", "rmsnorm"),
                                                  ("rmsnorm-ops", "layernorm-ops"), ("prmsnorm-ops", "rmsnorm-ops"))
                              if a in timed and b in timed)
                time_variants(task, timed, args.device, args.backend, preset.timing_rounds, preset.timing_steps,
                              out / "timing" / f"{t}.json", preset.timing_budget_s, pairs, amp=preset.autocast)
                if "layernorm" in variants:
                    norm_share(task, args.device, args.backend, out / "timing" / f"{t}-share.json")
                report.write_report(out, meta)
            dd.barrier()
    except KeyboardInterrupt:
        bar.close()
        print(f"\nrmsnorm reproduce: interrupted; finished runs and checkpoints are kept in {out}; run the same "
              "command again to resume", file=sys.stderr)
        return 130
    finally:
        if pool is not None:
            pool.close()
    bar.close()
    if dd.main:
        path = report.write_report(out, meta)
        print(f"rmsnorm reproduce: done in {time.time() - t_start:.0f} s; report: {path}")
        print(path.read_text())
    return 0


def _result_line(task: str, variant: str, seed: int, lr: float, res: dict, metric: str) -> str:
    """One training run's line of the log (run-log.txt's format)."""
    dev = f" (dev {res['dev'][metric]})" if "dev" in res else ""
    return f"{task} {variant} lr{lr:g} seed{seed}: {metric} {res.get(metric)}{dev} in {res['train_seconds']:.0f} s"


def _recorded_later(task: str, before: dict) -> dict:
    """The settings a folder written before they were recorded was trained with: 512 examples of held-out
    loss, and the data files of that time (the Bible's split 1500 test / 1000 dev verses)."""
    from .presets import DEV_LOSS_EXAMPLES
    from .tasks import TASK_CLASSES, data_file

    old_files = {"bible": "bible.en-es.tsv", "fashion": "fashion-mnist.npz"}
    which = before.get("data")
    file = old_files[TASK_CLASSES[task].dataset] if which == "full" else data_file(task, str(which))
    return {"dev_loss_examples": DEV_LOSS_EXAMPLES, "data_file": file}


# Task settings that do not change what a finished run holds: runs are kept per lr (so a grid can grow),
# and checkpoints and log lines only change how often something is written.
_NOT_BINDING = ("lr", "lrs", "ckpt_every", "log_every")


def _trained_with(preset, task: str, device: str, backend: str) -> dict:
    """What decides the numbers a finished run of ``task`` holds: its size and schedule, the data (and the
    file it is read from, whose name carries the held-out split), the device, autocast and the rmsnorm
    backend."""
    from .tasks import data_file

    size = {k: v for k, v in asdict(preset.tasks[task]).items() if k not in _NOT_BINDING}
    return {**size, "data": preset.data, "data_file": data_file(task, preset.data), "device": device,
            "autocast": preset.autocast, "backend": backend}


def _read_meta(out: Path) -> dict:
    import json

    try:
        return json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _check_folder(out: Path, old: dict, trained: dict[str, dict]) -> None:
    """Refuse to resume into ``out`` (its meta.json read as ``old``) when its finished runs of a task were
    trained with other settings (a resumed command keeps finished runs, so they would be mixed with new
    ones in one report)."""
    for task, now in trained.items():
        before = old.get("trained_with", {}).get(task)
        if before is not None:
            before = {**_recorded_later(task, before), **before}
        elif task in old.get("preset_config", {}):  # written before settings were recorded
            before = {k: v for k, v in old["preset_config"][task].items() if k not in _NOT_BINDING}
            now = {k: v for k, v in now.items() if k in before}
        if before is None or not (out / "runs" / task).exists():
            continue
        changed = [f"{k} {before.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(before) | set(now))
                   if before.get(k) != now.get(k)]
        if changed:
            raise UsageError(f"{out} holds {task} runs trained with other settings: {', '.join(changed)}; "
                             f"resume with the same settings, or use another --out")


def _schedule(size, seeds: int) -> list[tuple[int, float]]:
    """(seed, lr) of the runs a variant may need: seed 0 at every grid lr, the other seeds at the chosen one
    (counted at the first grid lr for the plan)."""
    if not size.lrs:
        return [(s, size.lr) for s in range(seeds)]
    return [(0, lr) for lr in size.lrs] + [(s, size.lrs[0]) for s in range(1, seeds)]


def _norm_shapes(preset) -> dict[str, tuple[int, int]]:
    """Every task's norm shapes, from the task sizes alone (no data is loaded)."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, size in task_sizes(preset).items():
        shapes.update(norm_shapes(name, size))
    return shapes


def _auto_backend(device: str) -> str:
    from rmsnorm.backends import registry

    return registry.select(None, torch.empty(1, 8, device=device), None, plain(torch.float32)).name


class _NoBar:
    def update(self, *_):
        pass

    def set_description(self, *_):
        pass

    def set_postfix(self, **_):
        pass

    def write(self, text):
        print(text, flush=True)

    def close(self):
        pass


def _bar(total: int, disabled: bool):
    if disabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare the reproduction's data sets from Debian packages, or show status")
    p.add_argument("--force", action="store_true", help="rebuild even if prepared")
    p.add_argument("--status", action="store_true", help="only show where each data set is")
    p.set_defaults(fn=data_main)


def data_main(args: argparse.Namespace) -> int:
    from . import data

    if not args.status:
        try:
            for name, path in data.prepare(force=args.force).items():
                print(f"{name}: {path}")
        except data.DataMissing as exc:
            print(f"rmsnorm data: {exc}", file=sys.stderr)
            return 3
    for name, state in data.status().items():
        print(f"{name}: {state}")
    return 0

