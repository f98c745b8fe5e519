"""Launch configurations of the Triton kernels, chosen from (M, N, itemsize, SM count).

Two layers: the tuned table ``tuned.json`` beside this file (written by benchmarks/gpu_tune.py: for each
pass, element size and measured N, the fastest candidate that passed its correctness check; a row of N
uses the entry of the largest measured N <= N), and below it the hand-set rules, which cover N below the
table and any run without it.

Every threshold below says where it comes from. "H200 run" means benchmarks/gpu_check.py (and its
exploration sweeps) on the NVIDIA H200 lent on 2026-11-27 (see docs/benchmarks/gpu.md; no H100 has been
measured yet); "ptxas" means register and spill counts from benchmarks/triton_ptxas.py for a Hopper SM
(65536 32-bit registers, at most 255 per thread).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import triton


@dataclass(frozen=True)
class FwdConfig:
    block_m: int  # rows per program (several for small N)
    block_n: int  # columns per tile: the whole row when single, the loop step (looped), the chunk (team)
    num_warps: int
    single: bool  # the row lives in registers (one pass over memory)
    team: int = 0  # not single: G > 0 programs share each row (split-row team kernel), chunks of block_n
    programs: int = 0  # not single: persistent grid size (0: one program per row, or from occupancy for teams)
    evict: bool = False  # looped: L2 eviction hints that keep the rows in flight between the two passes


@dataclass(frozen=True)
class BwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    single: bool  # rows in registers, persistent grid; else the two-kernel column-tiled path
    programs: int  # grid size: persistent programs (single) or row groups per column tile (tiled); teams: 0
    acc_in_regs: bool = True  # single: gain and dW/db accumulators in registers (else in L2-resident partials)
    team: int = 0  # not single: G > 0 programs share each row (split-row team kernel), chunks of block_n


@dataclass(frozen=True)
class Limits:
    # Largest row held in registers in the forward (ptxas: 32K at 32 warps 63 registers, no spill; 64K
    # spills 196 B a thread). Beyond, a looped two-pass kernel. H200 run, bf16, % of copy: 32K single 86%,
    # looped 46-63%.
    fwd_single_max: int = 32768
    # Backward rows in registers up to this N; beyond, the column-tiled two-kernel path (10 bytes moved
    # per bf16 element instead of 6). H200 run, bf16, % of copy: N=16K rows-in-registers with L2 partials
    # 43-44%, tiled 53%; N=32K rows 12% (ptxas: 400-700 B of spills a thread), tiled 53%.
    bwd_single_max: int = 8192
    # Up to this N the gain and the dW accumulator stay in registers (ptxas: 8K at 16 warps, 113 registers,
    # no spills; 16K spills 1.2 KB a thread); beyond, the program's partial row (L2) is updated per row
    # (H200 run, N=8K: registers 74-75%, partials 43%).
    bwd_acc_regs_max: int = 8192
    # Elements per program tile for small N (several rows per program). H200 run, forward N=1024 bf16:
    # 4 rows x 8 warps 98% of copy, 1 row 55%, 2 rows 74%, 8 rows 67-70%.
    tile_elements: int = 4096
    # Step of the looped forward and of the column tiles of the tiled backward (H200 run: 4096 at 8 warps
    # 58-62%, 8192 at 16 warps 63%, 2048 49% in the forward; 4096 53% vs 2048 44% in the tiled backward).
    loop_block: int = 4096
    # Persistent backward: programs per SM. H200 run, N=4096 bf16: 2 per SM 80% of copy, 4 per SM 76%,
    # 1 per SM (16 warps) 41%.
    bwd_programs_per_sm: int = 2


LIMITS = Limits()


def _warps(elements: int) -> int:
    """Warps for a tile: 4 to 32 warps, 8-16 fp32 values a thread (H200 run, forward bf16: N=4096 at 8
    warps 97% vs 4 or 16 warps 39%; N=16384 at 16 warps 97% vs 8 warps 54%, 32 warps 61%)."""
    if elements >= 32768:
        return 32
    if elements >= 8192:
        return 16
    if elements >= 2048:
        return 8
    return 4


TUNED_FILE = Path(__file__).with_name("tuned.json")


@functools.cache
def tuned_table(path: Path = TUNED_FILE) -> dict:
    """The tuned table: {"fwd" | "bwd": {itemsize: [entry, ...] sorted by n}, "meta": {...}}; {} if absent."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    table: dict = {"meta": raw.get("meta", {})}
    for kind in ("fwd", "bwd"):
        table[kind] = {int(k): sorted(v, key=lambda e: e["n"]) for k, v in raw.get(kind, {}).items()}
    return table


def _tuned_entry(kind: str, n: int, itemsize: int, table: dict) -> dict | None:
    entries = table.get(kind, {}).get(itemsize, [])
    below = [e for e in entries if e["n"] <= n]
    return below[-1] if below else None


def team_size(n: int, chunk: int) -> int:
    """Programs per row for chunks of ``chunk`` columns: the power of two that covers N."""
    return triton.next_power_of_2(triton.cdiv(n, chunk))


def fwd_config(m: int, n: int, itemsize: int = 2, limits: Limits = LIMITS, table: dict | None = None) -> FwdConfig:
    """Forward launch configuration; ``table`` replaces the tuned table (``{}``: the hand-set rules only)."""
    if table is None:
        return _fwd_cached(m, n, itemsize, limits)
    return _fwd(m, n, itemsize, limits, table)


def bwd_config(m: int, n: int, sms: int, itemsize: int = 2, limits: Limits = LIMITS,
               table: dict | None = None) -> BwdConfig:
    """Backward launch configuration; ``table`` as in :func:`fwd_config`."""
    if table is None:
        return _bwd_cached(m, n, sms, itemsize, limits)
    return _bwd(m, n, sms, itemsize, limits, table)


def _fwd(m: int, n: int, itemsize: int, limits: Limits, table: dict) -> FwdConfig:
    e = _tuned_entry("fwd", n, itemsize, table)
    if e is not None:
        if e["kind"] == "team":
            return FwdConfig(1, e["block_n"], e["num_warps"], False, team=team_size(n, e["block_n"]))
        if e["kind"] == "looped":
            return FwdConfig(1, e["block_n"], e["num_warps"], False, programs=e.get("programs", 0),
                             evict=e.get("evict", False))
    if n <= limits.fwd_single_max:
        block_n = triton.next_power_of_2(n)
        block_m = max(1, min(limits.tile_elements // block_n, triton.next_power_of_2(max(m, 1))))
        return FwdConfig(block_m, block_n, _warps(block_m * block_n), True)
    return FwdConfig(1, limits.loop_block, _warps(limits.loop_block), False)


def _bwd(m: int, n: int, sms: int, itemsize: int, limits: Limits, table: dict) -> BwdConfig:
    e = _tuned_entry("bwd", n, itemsize, table)
    if e is not None and e["kind"] == "team":
        return BwdConfig(1, e["block_n"], e["num_warps"], False, 0, team=team_size(n, e["block_n"]))
    if n <= limits.bwd_single_max:
        block_n = triton.next_power_of_2(n)
        block_m = max(1, min(limits.tile_elements // block_n, triton.next_power_of_2(max(m, 1))))
        row_blocks = triton.cdiv(max(m, 1), block_m)
        programs = max(1, min(row_blocks, sms * limits.bwd_programs_per_sm))
        return BwdConfig(block_m, block_n, _warps(block_m * block_n), True, programs,
                         block_n <= limits.bwd_acc_regs_max)
    block_n = limits.loop_block
    col_tiles = triton.cdiv(n, block_n)
    groups = max(1, min(m, (sms * limits.bwd_programs_per_sm * 2) // col_tiles))
    return BwdConfig(1, block_n, _warps(block_n), False, groups)


def grouped_bwd_config(cfg: BwdConfig, period: int) -> BwdConfig:
    """A row-kernel backward config for group rows, ``period`` groups to a row of the call: the gain and
    dW/db partials are per group position, so they live in the partial rows (acc_in_regs False), and a
    row block takes at most one group of each position (block_m: the largest power of two dividing
    ``period``, at most the config's) so that its rows update distinct partial columns. Unmeasured on a
    GPU: the same row kernel as whole rows, one partial read-modify-write per row block."""
    block_m = 1
    while block_m * 2 <= cfg.block_m and period % (block_m * 2) == 0:
        block_m *= 2
    return replace(cfg, block_m=block_m, num_warps=_warps(block_m * cfg.block_n), acc_in_regs=False)


@functools.lru_cache(maxsize=4096)
def _fwd_cached(m: int, n: int, itemsize: int, limits: Limits) -> FwdConfig:
    return _fwd(m, n, itemsize, limits, tuned_table())


@functools.lru_cache(maxsize=4096)
def _bwd_cached(m: int, n: int, sms: int, itemsize: int, limits: Limits) -> BwdConfig:
    return _bwd(m, n, sms, itemsize, limits, tuned_table())


def reload_tuned_table() -> None:
    """Forget the cached table and configurations (after a tuning run rewrote tuned.json)."""
    tuned_table.cache_clear()
    _fwd_cached.cache_clear()
    _bwd_cached.cache_clear()
