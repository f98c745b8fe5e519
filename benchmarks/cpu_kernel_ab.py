"""Interleaved A/B timing of two builds of the CPU kernels in one process: the current build against an
earlier one, to see what a kernel change costs before the full ``rmsnorm bench``.

    python benchmarks/cpu_kernel_ab.py OTHER.so [--shapes 16384x128,64x512,...]

OTHER.so is an earlier build of kernel.cpp (e.g. from ~/.cache/torch_extensions/<py>_cpu/<name>/, made by
a checkout of the older commit); its functions must have the current signatures. Both are called raw
(no autograd, no Python layers), with the launch heuristics of this checkout, timed round-robin
(rmsnorm.bench.timing). Prints current/other time ratios for forward and backward (dx + dW).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rmsnorm.backends.cpu import build
from rmsnorm.backends.cpu.heuristics import launch
from rmsnorm.bench.sweep import cpu_model, parse_shapes
from rmsnorm.bench.timing import measure_group


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("other", type=Path)
    ap.add_argument("--shapes", type=parse_shapes,
                    default="16384x128,64x512,1x4096,4096x1024,8192x4096,2048x8192,512x32768")
    args = ap.parse_args()
    cur = build.module()
    spec = importlib.util.spec_from_file_location(args.other.stem.split(".")[0], args.other)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| M×N | dtype | fwd current/other | bwd current/other | other fwd µs | other bwd µs |")
    print("|---|---|---|---|---|---|")
    for m, n in args.shapes:
        for dt in (torch.float32, torch.bfloat16):
            x, w, dy = torch.randn(m, n, dtype=dt), torch.randn(n, dtype=dt), torch.randn(m, n, dtype=dt)
            blocks, stream = launch(x)
            fargs = (x, w, None, None, 1, n, 1e-6, False, 0.0, False, dt, blocks, stream)
            rstd = cur.forward(*fargs)[2]
            bargs = (dy, None, x, w, None, rstd, 1, n, 1e-6, False, 0.0, False, True, False, blocks, stream)
            t = measure_group({"of": lambda a=fargs: other.forward(*a), "cf": lambda a=fargs: cur.forward(*a),
                               "ob": lambda a=bargs: other.backward(*a), "cb": lambda a=bargs: cur.backward(*a)},
                              samples=15, budget_s=0.3)
            print(f"| {m}×{n} | {str(dt)[6:]} | {t['cf'].median_s / t['of'].median_s:.2f} | "
                  f"{t['cb'].median_s / t['ob'].median_s:.2f} | {t['of'].median_s * 1e6:.0f} | "
                  f"{t['ob'].median_s * 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
