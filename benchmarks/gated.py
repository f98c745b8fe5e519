"""Gated RMSNorm: rmsnorm.GatedRMSNorm (fused kernels) against the Hugging Face modules it replaces.

    LD_PRELOAD=libtcmalloc_minimal.so.4 python benchmarks/gated.py      # CPU, 2 threads
    python benchmarks/gated.py --device cuda                            # the Triton row kernels

Mamba-2's MambaRMSNormGated (the norm of x * silu(z) by groups of 1024, hidden 8192) and Qwen3-Next's
Qwen3NextRMSNormGated (the norm, then times silu(z), head dim 128), eager, 2 threads, no_grad forward and
forward + backward (input and gate gradients, weight gradient), each pair timed back to back, best of 7;
prints a Markdown table (µs, and our time over theirs).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import rmsnorm


def best_of(fn, calls: int, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(7):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main() -> int:
    import argparse

    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    dev = ap.parse_args().device
    torch.set_num_threads(2)
    cases = [("Mamba-2 (before, groups of 1024)", MambaRMSNormGated(8192, group_size=1024),
              rmsnorm.GatedRMSNorm(8192, group_size=1024, gate_mode="before", cast="llama", eps=1e-6), (1, 2048)),
             ("Qwen3-Next (after)", Qwen3NextRMSNormGated(128, eps=1e-6),
              rmsnorm.GatedRMSNorm(128, gate_mode="after", cast="llama", eps=1e-6), (64, 32768))]
    print(f"device: {dev}\n")
    print("| module | M×N | dtype | HF forward µs | rmsnorm forward µs (×) | HF fwd+bwd µs | rmsnorm fwd+bwd µs (×) |")
    print("|---|---|---|---|---|---|---|")
    for name, hf, ours, rows in cases:
        for dtype in (torch.float32, torch.bfloat16):
            h, o = copy.deepcopy(hf).to(dev, dtype), copy.deepcopy(ours).to(dev, dtype)
            n = h.weight.numel()
            for m in rows:
                big = m * n > 1_000_000
                x, z = torch.randn(m, n).to(dev, dtype), torch.randn(m, n).to(dev, dtype)
                with torch.no_grad():
                    a = best_of(lambda: h(x, z), 50 if big else 500, dev)  # noqa: B023
                    b = best_of(lambda: o(x, z), 50 if big else 500, dev)  # noqa: B023
                xg, zg, dy = x.clone().requires_grad_(), z.clone().requires_grad_(), torch.randn_like(x)
                c = best_of(lambda: h(xg, zg).backward(dy), 20 if big else 200, dev)  # noqa: B023
                d = best_of(lambda: o(xg, zg).backward(dy), 20 if big else 200, dev)  # noqa: B023
                print(f"| {name} | {m}×{n} | {str(dtype)[6:]} | {a:.1f} | {b:.1f} ({b / a:.2f}) | {c:.1f} | "
                      f"{d:.1f} ({d / c:.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
