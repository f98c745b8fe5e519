"""Registers and spills of the Triton kernels' heuristic configurations, compiled for sm_90 without a GPU.

    python benchmarks/triton_ptxas.py

Uses Triton's own ptxas (ptxas-blackwell understands the PTX version Triton 3.9 emits). The numbers
justify the register-budget thresholds in src/rmsnorm/backends/triton/heuristics.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rmsnorm.backends.triton import kernels as K
from rmsnorm.backends.triton.heuristics import bwd_config, fwd_config

PTXAS = next(p for p in (os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin", n)
                         for n in ("ptxas-blackwell", "ptxas")) if os.path.exists(p))
ALIGNED = {"X", "R", "W", "B", "Y", "H", "RSTD", "stride_x", "stride_r", "N", "DY", "DH", "Hp", "DX", "DWP", "DBP",
           "stride_dy", "stride_dh", "stride_h", "Z", "DZ"}
FWD_SIG = {"X": "*bf16", "R": "*bf16", "W": "*bf16", "B": "*bf16", "Y": "*bf16", "H": "*bf16", "RSTD": "*fp32",
           "stride_x": "i64", "stride_r": "i64", "M": "i32", "N": "i32", "K": "i32", "eps": "fp32", "offset": "fp32"}
BWD_SIG = {"DY": "*bf16", "DH": "*bf16", "Hp": "*bf16", "W": "*bf16", "RSTD": "*fp32", "DX": "*bf16", "DWP": "*fp32",
           "DBP": "*fp32", "stride_dy": "i64", "stride_dh": "i64", "stride_h": "i64", "M": "i32", "N": "i32",
           "K": "i32", "eps": "fp32", "offset": "fp32"}


def registers(fn, sig: dict, consts: dict, num_warps: int) -> tuple[int, int]:
    sig = {k: sig.get(k, "constexpr") for k in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in ALIGNED if k in fn.arg_names})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(kernel.asm["ptx"])
    out = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", fh.name, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    os.unlink(fh.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1


def main() -> None:
    print("| N | forward config | regs | spill B | backward config | regs | spill B |")
    print("|---|---|---|---|---|---|---|")
    for n in (1024, 4096, 8192, 16384, 32768, 65536, 262144):
        m = (1 << 27) // n
        f = fwd_config(m, n)
        fc = {"BLOCK_N": f.block_n, "HAS_R": False, "HAS_W": True, "HAS_B": False, "EPS_OUTSIDE": False,
              "LLAMA": False, "NORM_TY": tl.bfloat16}
        if f.single:
            fr = registers(K._fwd_rows, {**FWD_SIG, "Z": "*bf16"}, {**fc, "BLOCK_M": f.block_m, "PARTIAL": False},
                           f.num_warps)
        else:
            fr = registers(K._fwd_looped, FWD_SIG, fc, f.num_warps)
        b = bwd_config(m, n, 132)
        bc = {"BLOCK_N": b.block_n, "HAS_DH": False, "HAS_W": True, "NEED_DW": True, "NEED_DB": False,
              "PARTIAL": False, "EPS_OUTSIDE": False, "LLAMA": False}
        if b.single:
            br = registers(K._bwd_rows, {**BWD_SIG, "Z": "*bf16", "DZ": "*bf16", "B": "*bf16"},
                           {**bc, "BLOCK_M": b.block_m, "ACC_IN_REGS": b.acc_in_regs},
                           b.num_warps)
        else:
            br = registers(K._bwd_tiled, {**BWD_SIG, "S": "*fp32"}, bc, b.num_warps)
        print(f"| {n} | {f} | {fr[0]} | {fr[1]} | {b} | {br[0]} | {br[1]} |")


if __name__ == "__main__":
    main()
