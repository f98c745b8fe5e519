"""Launch heuristics of the CPU kernels: row blocks (threads) and non-temporal stores.

Both thresholds come from ``python -m rmsnorm.bench.calibrate`` (tables in docs/benchmarks/cpu.md,
"Launch thresholds"), on the 2-core VMs this project is built on:

- parallel_min_elements (forward and backward): M x 512 on one thread vs two. Xeon (Sapphire Rapids):
  even from 32K to 64K (0.84-1.23 over runs), wins from 128K. AMD EPYC (2026-11-28): the kernels alone
  win from 32K (forward 0.82-0.83, backward 0.84-0.89), but whole calls at 32K elements (8 x 4096,
  64 x 512) were better on one thread: the slowest RMSNorm/F.layer_norm ratio of the latency cells 0.94
  at 64K vs 0.98 at 32K (two alternating runs each), and 1.12-1.40 at 32K in two runs where the second
  vCPU woke late. 64K: no thread wake-up below it.
- stream_min_bytes: non-temporal stores cost 1.41x at a 1 MB fp32 output (the output would have stayed in
  cache) and save 25-45% from 4 MB up. We stream from 8 MB, past the combined L2 of the cores, so that
  outputs a following op could still read from cache are left there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuLaunch:
    parallel_min_elements: int = 1 << 16
    stream_min_bytes: int = 8 << 20


LAUNCH = CpuLaunch()


def launch(x: torch.Tensor, cfg: CpuLaunch | None = None) -> tuple[int, bool]:
    """(row blocks, stream) for a call on x: one block per thread (the kernel caps it at the row count)."""
    cfg = cfg or LAUNCH
    numel = x.numel()
    blocks = 1 if numel < cfg.parallel_min_elements else torch.get_num_threads()
    return blocks, numel * x.element_size() >= cfg.stream_min_bytes
