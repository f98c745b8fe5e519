"""Measurements behind the CPU launch heuristics (``python -m rmsnorm.bench.calibrate``).

1. parallel_min_elements: forward time with 1 block vs one block per thread, over problem sizes;
   backward_parallel_min_elements: the same for the backward (dx and dW).
2. stream_min_bytes: forward time with and without non-temporal stores, over output sizes.
Each pair is timed round-robin; the table prints the ratio (< 1: the second option is faster).
"""

from __future__ import annotations

import argparse

import torch

from ..backends.cpu import build
from ..spec import Spec
from .timing import measure_group


def _fwd(mod, x, w, blocks: int, stream: bool):
    spec = Spec(1, x.shape[-1], 1e-6, False, 0.0, None, x.dtype, False)
    return lambda: mod.forward(x, w, None, None, spec, blocks, stream)


def _bwd(mod, x, w, blocks: int):
    spec = Spec(1, x.shape[-1], 1e-6, False, 0.0, None, x.dtype, False)
    _, _, rstd = mod.forward(x, w, None, None, spec, 1, False)
    dy = torch.randn_like(x)
    return lambda: mod.backward(dy, None, x, w, None, rstd, spec, True, False, blocks, False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    mod = build.load()
    threads = torch.get_num_threads()
    print(f"threads {threads}, dtype {dtype}")
    print("\n| elements (M x 512) | 1 block µs | {threads} blocks µs | ratio |".replace("{threads}", str(threads)))
    print("|---|---|---|---|")
    for m in (4, 16, 32, 64, 128, 256, 1024):
        x, w = torch.randn(m, 512, dtype=dtype), torch.randn(512, dtype=dtype)
        t = measure_group({"1": _fwd(mod, x, w, 1, False), "n": _fwd(mod, x, w, threads, False)}, samples=15)
        print(f"| {m * 512} | {t['1'].median_s * 1e6:.1f} | {t['n'].median_s * 1e6:.1f} | "
              f"{t['n'].median_s / t['1'].median_s:.2f} |")
    print(f"\n| backward, elements (M x 512) | 1 block µs | {threads} blocks µs | ratio |")
    print("|---|---|---|---|")
    for m in (4, 16, 32, 64, 128, 256, 1024):
        x, w = torch.randn(m, 512, dtype=dtype), torch.randn(512, dtype=dtype)
        t = measure_group({"1": _bwd(mod, x, w, 1), "n": _bwd(mod, x, w, threads)}, samples=15)
        print(f"| {m * 512} | {t['1'].median_s * 1e6:.1f} | {t['n'].median_s * 1e6:.1f} | "
              f"{t['n'].median_s / t['1'].median_s:.2f} |")
    print("\n| output MB (M x 4096) | plain µs | streaming µs | ratio |")
    print("|---|---|---|---|")
    for mb in (1, 4, 8, 16, 32, 64, 128):
        m = mb * (1 << 20) // (4096 * x.element_size())
        x, w = torch.randn(m, 4096, dtype=dtype), torch.randn(4096, dtype=dtype)
        t = measure_group({"p": _fwd(mod, x, w, threads, False), "s": _fwd(mod, x, w, threads, True)}, samples=15)
        print(f"| {mb} | {t['p'].median_s * 1e6:.0f} | {t['s'].median_s * 1e6:.0f} | "
              f"{t['s'].median_s / t['p'].median_s:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
