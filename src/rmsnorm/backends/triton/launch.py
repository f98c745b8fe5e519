"""Launchers of the Triton kernels on (M, N) row views (see rmsnorm.backends.rows)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...args import Params
from . import kernels
from .heuristics import BwdConfig, FwdConfig, bwd_config, fwd_config

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter on CPU tensors: a few "programs" exercise the persistent loops


def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            residual: torch.Tensor | None, prm: Params, out_dtype: torch.dtype, config: FwdConfig | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    m, n = x.shape
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    h = torch.empty((m, n), dtype=residual.dtype, device=x.device) if residual is not None else None
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return y, h, rstd
    cfg = config or fwd_config(m, n)
    w = weight.contiguous() if weight is not None else x
    b = bias.contiguous() if bias is not None else x
    r = residual if residual is not None else x
    args = (x, r, w, b, y, h if h is not None else y, rstd, x.stride(0), r.stride(0), m, n, prm.k, prm.eps,
            prm.offset)
    flags = {"HAS_R": residual is not None, "HAS_W": weight is not None, "HAS_B": bias is not None,
             "EPS_OUTSIDE": prm.eps_outside, "LLAMA": prm.llama,
             "NORM_TY": _TL[residual.dtype if residual is not None else x.dtype]}
    if cfg.single:
        grid = (triton.cdiv(m, cfg.block_m),)
        kernels._fwd_rows[grid](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PARTIAL=prm.k < n,
                                num_warps=cfg.num_warps, **flags)
    else:
        kernels._fwd_looped[(m,)](*args, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, **flags)
    return y, h, rstd


def backward(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
             rstd: torch.Tensor, prm: Params, need_dw: bool, need_db: bool, config: BwdConfig | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    m, n = h.shape
    dx = torch.empty((m, n), dtype=h.dtype, device=h.device)
    cfg = config or bwd_config(m, n, sm_count(h.device))
    programs = cfg.programs
    f32 = {"dtype": torch.float32, "device": h.device}
    # every program writes its whole partial row, except the in-place (L2 partials) variant: zero it
    alloc = torch.empty if (cfg.acc_in_regs or not cfg.single) and m > 0 else torch.zeros
    dwp = alloc((programs, n), **f32) if need_dw else None
    dbp = alloc((programs, n), **f32) if need_db else None
    if m > 0:
        w = weight.contiguous() if weight is not None else h
        d = dh if dh is not None else h
        flags = {"HAS_DH": dh is not None, "HAS_W": weight is not None, "NEED_DW": need_dw, "NEED_DB": need_db,
                 "PARTIAL": prm.k < n, "EPS_OUTSIDE": prm.eps_outside, "LLAMA": prm.llama}
        parts = (dwp if dwp is not None else rstd, dbp if dbp is not None else rstd)
        if cfg.single:
            kernels._bwd_rows[(programs,)](dy, d, h, w, rstd, dx, *parts, dy.stride(0), d.stride(0), h.stride(0), m,
                                           n, prm.k, prm.eps, prm.offset, BLOCK_M=cfg.block_m,
                                           BLOCK_N=cfg.block_n, ACC_IN_REGS=cfg.acc_in_regs,
                                           num_warps=cfg.num_warps, **flags)
        else:
            s = torch.empty((m,), **f32)
            kernels._bwd_rowdot[(m,)](dy, h, w, s, dy.stride(0), h.stride(0), n, prm.offset,
                                      BLOCK_N=cfg.block_n, HAS_W=weight is not None, num_warps=cfg.num_warps)
            grid = (triton.cdiv(n, cfg.block_n), programs)
            kernels._bwd_tiled[grid](dy, d, h, w, rstd, s, dx, *parts, dy.stride(0), d.stride(0), h.stride(0), m,
                                     n, prm.k, prm.eps, prm.offset, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                                     **flags)
    dw = dwp.sum(0) if need_dw else None  # fixed-order reduction of per-program partials
    db = dbp.sum(0) if need_db else None
    return dx, dw, db
