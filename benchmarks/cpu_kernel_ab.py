"""Interleaved A/B timing of two builds of the CPU kernels in one process: the current build against the
kernel source of an earlier commit, to see what a kernel change costs before the full ``rmsnorm bench``.

    python benchmarks/cpu_kernel_ab.py REV [--shapes 16384x128,64x512,...] [--no-gain]

REV is a git revision; its src/rmsnorm/backends/cpu/kernel.cpp is compiled under another extension name
(Python keeps one module per name: a second build of the same name would load as the first) with this
host's flags; its functions must have the current signatures. Both are called raw (no autograd, no
Python layers), with the launch heuristics of this checkout, timed round-robin (rmsnorm.bench.timing).
Prints current/other time ratios for forward and backward (dx + dW; dx alone with --no-gain).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rmsnorm.backends.cpu import build
from rmsnorm.backends.cpu.heuristics import launch
from rmsnorm.bench.sweep import cpu_model, parse_shapes
from rmsnorm.bench.timing import measure_group
from rmsnorm.spec import plain


def build_revision(rev: str):
    """The kernels of ``rev``'s kernel.cpp, built (cached) as an extension of their own name."""
    from torch.utils.cpp_extension import load

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:src/rmsnorm/backends/cpu/kernel.cpp"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    name = "rmsnorm_cpu_ab_" + hashlib.sha256(source.encode()).hexdigest()[:12]
    work = Path(tempfile.gettempdir()) / name
    work.mkdir(exist_ok=True)
    (work / "kernel.cpp").write_text(source)
    return load(name=name, sources=[str(work / "kernel.cpp")], extra_cflags=["-O3", "-fopenmp", *build.flags()],
                extra_ldflags=["-fopenmp"], build_directory=str(work), verbose=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="the git revision whose kernel.cpp is the other build")
    ap.add_argument("--shapes", type=parse_shapes,
                    default="16384x128,64x512,1x4096,4096x1024,8192x4096,2048x8192,512x32768")
    ap.add_argument("--no-gain", dest="gain", action="store_false", help="calls without a gain (no dW)")
    args = ap.parse_args()
    cur = build.module()
    other = build_revision(args.rev)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{'with' if args.gain else 'without'} a gain")
    print("| M×N | dtype | fwd current/other | bwd current/other | other fwd µs | other bwd µs |")
    print("|---|---|---|---|---|---|")
    for m, n in args.shapes:
        for dt in (torch.float32, torch.bfloat16):
            x, dy = torch.randn(m, n, dtype=dt), torch.randn(m, n, dtype=dt)
            w = torch.randn(n, dtype=dt) if args.gain else None
            blocks, stream = launch(x)
            spec = plain(dt, n)
            fargs = (x, w, None, None, spec, blocks, stream)
            rstd = cur.forward(*fargs)[2]
            bargs = (dy, None, x, w, None, rstd, spec, w is not None, False, blocks, stream)
            t = measure_group({"of": lambda a=fargs: other.forward(*a), "cf": lambda a=fargs: cur.forward(*a),
                               "ob": lambda a=bargs: other.backward(*a), "cb": lambda a=bargs: cur.backward(*a)},
                              samples=15, budget_s=0.3)
            print(f"| {m}×{n} | {str(dt)[6:]} | {t['cf'].median_s / t['of'].median_s:.2f} | "
                  f"{t['cb'].median_s / t['ob'].median_s:.2f} | {t['of'].median_s * 1e6:.0f} | "
                  f"{t['ob'].median_s * 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
