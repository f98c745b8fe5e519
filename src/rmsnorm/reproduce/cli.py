"""``rmsnorm reproduce``: train every task x variant x seed, time the variants, write the report."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
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
from .norms import VARIANTS, check_variants
from .presets import PRESETS, get_preset, with_overrides
from .tasks import TASKS, check_tasks


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's experiments at small scale on real data",
                       description="Trains each task with every normalization variant, times the variants, and "
                                   "writes results.json/csv, report.md and figures beside the paper's numbers.")
    p.add_argument("--preset", default="quick", choices=list(PRESETS), help=f"one of {', '.join(PRESETS)} "
                   "(default quick)")
    p.add_argument("--tasks", type=choices_list(TASKS, "task"), default=",".join(TASKS),
                   help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--variants", type=choices_list(VARIANTS, "variant"), default=",".join(VARIANTS),
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=positive_int, default=None, help="number of seeds (default: the preset's)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps of every run (default: the preset's)")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda")
    p.add_argument("--backend", type=backend_name, default=None,
                   help="rmsnorm backend for the rmsnorm variants (default: automatic)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=writable_dir, default=None,
                   help="output directory (default runs/reproduce-<preset>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    from .runner import finished, run_dir

    try:
        preset = with_overrides(get_preset(args.preset), args.seeds, args.steps)
        tasks = check_tasks(_listed(args.tasks))
        variants = check_variants(_listed(args.variants))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if any(t.startswith("mt") for t in tasks) and not _importable("sacrebleu"):
        raise UsageError("the translation tasks need sacrebleu: install the experiments extra "
                         "(pip install 'rmsnorm[experiments]')")
    out = args.out or Path("runs") / f"reproduce-{preset.name}"
    if not args.dry_run:
        out = output_dir(out)  # a plan shows where it would write, and creates nothing
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [(t, v, s) for t in tasks for s in range(preset.seeds) for v in variants]
    if args.dry_run:
        print(f"preset {preset.name} ({preset.data} data), {preset.seeds} seed(s), output {out}")
        for t in tasks:
            size = preset.tasks[t]
            print(f"  {t}: {len(variants)} variants x {preset.seeds} seeds x {size.steps} steps (batch {size.batch}), "
                  f"then {preset.timing_rounds} timing rounds x {preset.timing_steps} steps per variant")
        done = sum(finished(out, t, v, s) for t, v, s in runs)
        print(f"  {len(runs)} training runs, {done} already finished (they are not trained again)")
        return 0
    _maybe_tcmalloc(getattr(args, "allocator", "current"))
    from . import report
    from .atomic import atomic_json
    from .data import DataMissing
    from .runner import Dist, time_variants, train_run
    from .tasks import make_task

    dd = Dist(args.device)
    meta = {"preset": preset.name, "command": command_line("reproduce"),
            "machine": cpu_model() if args.device == "cpu" else torch.cuda.get_device_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "backend": args.backend or _auto_backend(args.device), "world_size": dd.world, "allocator": allocator(),
            "started": time.strftime("%Y-%m-%d %H:%M %Z")}
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_json(out / "meta.json", {**meta, "preset_config": {t: vars(preset.tasks[t]) for t in tasks}})
    total = sum(preset.tasks[t].steps for t, v, s in runs if not finished(out, t, v, s))
    bar = _bar(total, args.no_progress or not dd.main)
    t_start = time.time()
    try:
        for t in tasks:
            try:
                task = make_task(t, preset.tasks[t], preset.data, out / "work")
            except DataMissing as exc:
                print(f"rmsnorm reproduce: {exc}", file=sys.stderr)
                return 3
            if dd.main:
                atomic_json(out / "trivial" / f"{t}.json", task.trivial_baseline())
            for s in range(preset.seeds):
                for v in variants:
                    if finished(out, t, v, s):
                        continue
                    bar.set_description(f"{t} {v} seed{s}")
                    res = train_run(task, v, s, run_dir(out, t, v, s), args.device, args.backend, dd,
                                    on_step=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
                    if dd.main:
                        metric = res.get(task.metric)
                        bar.write(f"{t} {v} seed{s}: {task.metric} {metric} in {res['train_seconds']:.0f} s")
                        report.write_report(out, meta)
            if dd.main:
                bar.set_description(f"{t} timing")
                time_variants(task, variants, args.device, args.backend, preset.timing_rounds, preset.timing_steps,
                              out / "timing" / f"{t}.json")
                report.write_report(out, meta)
            dd.barrier()
    except KeyboardInterrupt:
        bar.close()
        print(f"\nrmsnorm reproduce: interrupted; finished runs and checkpoints are kept in {out}; run the same "
              "command again to resume", file=sys.stderr)
        return 130
    bar.close()
    if dd.main:
        path = report.write_report(out, meta)
        print(f"rmsnorm reproduce: done in {time.time() - t_start:.0f} s; report: {path}")
        print(path.read_text())
    return 0


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

