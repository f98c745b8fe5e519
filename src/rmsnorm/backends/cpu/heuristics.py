"""Launch heuristics of the CPU kernels: how many row blocks (threads) a call uses.

PARALLEL_MIN_ELEMENTS is measured by ``python -m rmsnorm.bench.calibrate`` (see docs/benchmarks/cpu.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuLaunch:
    # Below this many elements (M*N) one thread is faster: waking the pool costs more than it saves.
    parallel_min_elements: int = 1 << 15


LAUNCH = CpuLaunch()


def blocks(x: torch.Tensor, launch: CpuLaunch = LAUNCH) -> int:
    """Row blocks for a call on x: one per thread (the kernel caps it at the row count), or 1 if small."""
    if x.numel() < launch.parallel_min_elements:
        return 1
    return torch.get_num_threads()
