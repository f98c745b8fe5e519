"""Launch configurations of the Triton kernels, chosen from (M, N, itemsize, SM count).

Every threshold below says where it comes from. "H100 run" means benchmarks/gpu_check.py on an
NVIDIA H100 80GB HBM3 (see docs/benchmarks/gpu.md); "register budget" means arithmetic on the
65536 32-bit registers of a Hopper SM (at most 255 per thread).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class FwdConfig:
    block_m: int  # rows per program (several for small N)
    block_n: int  # columns per tile: the whole row when single, else the loop step
    num_warps: int
    single: bool  # the row lives in registers (one pass over memory)


@dataclass(frozen=True)
class BwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    single: bool  # rows in registers, persistent grid; else the two-kernel column-tiled path
    programs: int  # grid size: persistent programs (single) or row groups per column tile (tiled)
    acc_in_regs: bool = True  # single: gain and dW/db accumulators in registers (else in L2-resident partials)


@dataclass(frozen=True)
class Limits:
    # Largest row held in registers in the forward: 32K fp32 values over 32 warps is 32 registers a
    # thread for x (register budget); beyond, a looped two-pass kernel (the row re-read from L2).
    fwd_single_max: int = 32768
    # Backward rows in registers up to this N; beyond, the column-tiled two-kernel path (10 bytes moved
    # per bf16 element instead of 6). ptxas for sm_90: 16K at 32 warps spills about 100 bytes a thread,
    # 32K about 700 (L1/L2-resident local memory).
    bwd_single_max: int = 32768
    # Up to this N the gain and the dW accumulator stay in registers (ptxas: 8K at 16 warps, 128 registers,
    # no spills; 16K spills 1.2 KB a thread); beyond, the program's partial row (L2) is updated per row.
    bwd_acc_regs_max: int = 8192
    # Elements per program tile for small N (several rows per program): 4096 elements is 16 fp32 values
    # a thread at 8 warps, enough bytes in flight per SM at 2+ programs per SM.
    tile_elements: int = 4096
    # Step of the looped forward and of the column tiles of the tiled backward.
    loop_block: int = 4096
    # Persistent backward: programs per SM (2 keeps two row blocks' loads in flight per SM).
    bwd_programs_per_sm: int = 2


LIMITS = Limits()


def _warps(elements: int) -> int:
    """Warps for a tile: about 8-16 fp32 values per thread, 4 to 32 warps (Liger's and flash-attn's rule)."""
    if elements >= 32768:
        return 32
    if elements >= 8192:
        return 16
    if elements >= 2048:
        return 8
    return 4


def fwd_config(m: int, n: int, limits: Limits = LIMITS) -> FwdConfig:
    if n <= limits.fwd_single_max:
        block_n = triton.next_power_of_2(n)
        block_m = max(1, min(limits.tile_elements // block_n, triton.next_power_of_2(max(m, 1))))
        return FwdConfig(block_m, block_n, _warps(block_m * block_n), True)
    return FwdConfig(1, limits.loop_block, _warps(limits.loop_block), False)


def bwd_config(m: int, n: int, sms: int, limits: Limits = LIMITS) -> BwdConfig:
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
