"""``rmsnorm bench``: argument parsing and the run (results.jsonl, results.csv, report.md, gbps.png)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..cli_args import choices_list, device, output_dir, positive_float, positive_int, writable_dir
from ..host import allocator, command_line, rerun_under_tcmalloc
from .providers import DEFAULT_PROVIDERS, registry
from .sweep import DTYPES, LATENCY_SHAPES, TARGET_SHAPES, SweepConfig, parse_shapes, run_sweep

MODES = ("fwd", "bwd", "fwd+bwd")


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        return parse_shapes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time rmsnorm against torch and the copy roofline",
                       description="Times providers over shapes, dtypes and modes; writes JSONL, CSV, Markdown, PNG.")
    p.add_argument("--shapes", type=_shapes, default=None,
                   help="MxN list, e.g. 4096x1024,64x512 (default: the latency cases and the CPU target shapes "
                        "of docs/benchmarks/cpu.md)")
    p.add_argument("--dtypes", type=choices_list(DTYPES, "dtype"), default="fp32,bf16",
                   help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--modes", type=choices_list(MODES, "mode"), default="fwd,bwd,fwd+bwd",
                   help="comma list of fwd, bwd, fwd+bwd")
    p.add_argument("--providers", type=choices_list(registry(), "provider"), default=",".join(DEFAULT_PROVIDERS),
                   help="comma list; available: " + ", ".join(registry()))
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--samples", type=positive_int, default=10, help="timed samples per cell (at least 5 are taken)")
    p.add_argument("--budget", type=positive_float, default=0.5, help="seconds of sampling per cell")
    p.add_argument("--allocator", choices=["current", "tcmalloc"], default="current",
                   help="tcmalloc: re-run under LD_PRELOAD tcmalloc so no provider pays glibc's page faults")
    p.add_argument("--out", type=writable_dir, default=None,
                   help="output folder (default bench-results/<time>-<device>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--latency", action="store_true",
                   help="instead of the sweep: per-call cost on small shapes (1x4096, 8x4096, 64x480, 64x512) at 1 "
                        "and 2 threads, module and functional calls against nn.LayerNorm / F.layer_norm")
    p.set_defaults(fn=main)


def _listed(value, allowed, what: str) -> list[str]:
    """argparse applies ``type`` to string defaults too; a list passed programmatically is checked here."""
    return value if isinstance(value, list) else choices_list(allowed, what)(value)


def main(args: argparse.Namespace) -> int:
    import torch

    from . import report

    if args.allocator == "tcmalloc":
        rerun_under_tcmalloc("bench", required=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes, modes = _listed(args.dtypes, DTYPES, "dtype"), _listed(args.modes, MODES, "mode")
    latency_mode = getattr(args, "latency", False)
    out = args.out or output_dir(Path("bench-results") /
                                 f"{time.strftime('%Y%m%d-%H%M%S')}-{'latency' if latency_mode else device}")
    if latency_mode:
        from . import latency

        print(f"rmsnorm bench --latency: {len(latency.SHAPES)} shapes, allocator {allocator()} -> {out}", flush=True)
        latency.run(out, [DTYPES[d] for d in dtypes])
        print((out / "latency.md").read_text(), flush=True)
        return 0
    providers = _listed(args.providers, registry(), "provider")
    cfg = SweepConfig(shapes=args.shapes or LATENCY_SHAPES + TARGET_SHAPES, dtypes=dtypes, modes=modes,
                      providers=providers, device=device, samples=args.samples, budget_s=args.budget)
    command = command_line("bench")
    t0 = time.time()
    print(f"rmsnorm bench: {len(cfg.shapes)} shapes x {len(dtypes)} dtypes x {len(modes)} modes on {device}, "
          f"{torch.get_num_threads()} threads, allocator {allocator()} -> {out}", flush=True)
    rows = run_sweep(cfg, out / "results.jsonl", command)
    meta, results = rows[0], rows[1:]
    report.write_csv(results, out / "results.csv")
    text = report.markdown(meta, results)
    if device == "cpu":
        targets = report.cpu_targets(results)
        if targets:
            text += "\n### CPU targets (docs/benchmarks/cpu.md)\n\n" + report.targets_markdown(targets)
    (out / "report.md").write_text(text)
    if not args.no_plot:
        report.plot(results, out / "gbps.png", title=f"{meta['machine']}, {meta['threads']} threads, "
                    f"{meta['allocator']}, torch {meta['torch']}")
    print(f"rmsnorm bench: done in {time.time() - t0:.0f} s; wrote {out}/report.md", flush=True)
    return 0
