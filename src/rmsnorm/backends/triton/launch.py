"""Launchers of the Triton kernels on (M, N) row views (see rmsnorm.backends.rows)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...spec import Spec
from . import kernels, prebound
from .heuristics import BwdConfig, FwdConfig, bwd_config, fwd_config, grouped_bwd_config
from .prebound import Prebound

# every kernel is launched through its pre-bound launcher (prebound.py)
FWD_ROWS, FWD_TEAM = Prebound(kernels._fwd_rows), Prebound(kernels._fwd_team)
FWD_LOOPED, BWD_ROWS = Prebound(kernels._fwd_looped), Prebound(kernels._bwd_rows)
BWD_TEAM, BWD_ROWDOT = Prebound(kernels._bwd_team), Prebound(kernels._bwd_rowdot)
BWD_TILED, SUM_PARTIALS = Prebound(kernels._bwd_tiled), Prebound(kernels._sum_partials)

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _round_ty(spec: Spec):
    """The kernels' ROUND_TY: the spec's rounding dtype, fp32 (the identity on fp32 values) for none."""
    return _TL[spec.round_to] if spec.round_to is not None else tl.float32


def _rstd_ty(spec: Spec):
    """The forward kernels' RSTD_TY: the dtype 1/r is rounded through (cast "rstd"), fp32 for none."""
    return _TL[spec.rstd_round] if spec.rstd_round is not None else tl.float32


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter on CPU tensors: a few "programs" exercise the persistent loops


_BARRIERS: dict[tuple, torch.Tensor] = {}
MAX_TEAMS = 4096
TEAM_MAX = 64  # programs per team (the partial statistics of a row are read as one GMAX-wide vector)


def _barrier_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrival counts and generations of the team barriers: zeroed once per (device, stream); the barrier
    leaves the counts at zero, so no launch needs a reset (and CUDA graphs may capture the kernels)."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _BARRIERS.get(key)
    if buf is None:
        buf = _BARRIERS[key] = torch.zeros(2 * MAX_TEAMS, dtype=torch.int32, device=device)
    return buf[:MAX_TEAMS], buf[MAX_TEAMS:]


def team_grid(compiled, num_warps: int, sms: int, g: int, rows: int, device: torch.device) -> int:
    """Teams of g programs: as many as are co-resident on the device (every program must be, since they
    wait for each other), at most one per row and MAX_TEAMS. Registers are counted in the hardware's
    allocation unit (8 per thread); anything unknown counts as one program per SM."""
    per_sm = 1
    if device.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(device)
            regs = -(-max(1, compiled.n_regs) // 8) * 8 * 32 * num_warps
            per_sm = min(getattr(props, "regs_per_multiprocessor", 65536) // regs,
                         getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps), 32)
            smem = getattr(compiled.metadata, "shared", 0)
            if smem:
                per_sm = min(per_sm, getattr(props, "shared_memory_per_multiprocessor", 233472) // smem)
        except Exception:  # a Triton without these fields: the safe lower bound
            per_sm = 1
    return max(1, min((sms * max(1, per_sm)) // g, rows, MAX_TEAMS))


def _gate_consts(spec: Spec, gated: bool) -> dict:
    """The gate's constexprs of the row kernels (GATE 0 when the call has no gate tensor)."""
    return {"GATE": {"before": 1, "after": 2}.get(spec.gate or "", 0) if gated else 0,
            "ACT": 1 if spec.gate_act == "sigmoid" else 0,
            "GATE_ROUND_TY": _TL[spec.gate_round] if spec.gate_round is not None else tl.float32}


def gated_supported(m: int, n: int, itemsize: int, device: torch.device) -> bool:
    """Whether a gated call of (M, N) rows runs on the row kernels (the only ones with a gate)."""
    return fwd_config(m, n, itemsize).single and bwd_config(m, n, sm_count(device), itemsize).single


def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            residual: torch.Tensor | None, spec: Spec, out: tuple | None = None,
            config: FwdConfig | None = None, gate: torch.Tensor | None = None, period: int = 1
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(y, h, rstd) of (M, N) rows; ``out``: contiguous (M, N) tensors (y, h | None) to write into;
    ``gate``: contiguous (M, N) rows of a gated call (``spec.gate``; row kernels only); ``period`` > 1: the
    rows are groups, ``period`` of them to a row of the call, sharing a gain (and bias) of period * N."""
    m, n = x.shape
    if out is not None:
        y, h = out
    else:
        y = torch.empty((m, n), dtype=spec.out_dtype, device=x.device)
        h = torch.empty((m, n), dtype=residual.dtype, device=x.device) if residual is not None else None
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return y, h, rstd
    cfg = config or fwd_config(m, n, x.element_size())
    w = weight.contiguous() if weight is not None else x
    b = bias.contiguous() if bias is not None else x
    r = residual if residual is not None else x
    ptrs = (x, r, w, b, y, h if h is not None else y, rstd)
    scalars = (x.stride(0), r.stride(0), m, n, spec.k, spec.eps, spec.offset)
    flags = {"HAS_R": residual is not None, "HAS_W": weight is not None, "HAS_B": bias is not None,
             "EPS_OUTSIDE": spec.eps_outside, "ROUND_TY": _round_ty(spec), "RSTD_TY": _rstd_ty(spec),
             "NORM_TY": _TL[residual.dtype if residual is not None else x.dtype]}
    if (gate is not None or period > 1) and not cfg.single:
        raise ValueError(f"gated or grouped rows of {n} elements need the row kernel; config {cfg} is not one")
    if cfg.single:
        grid = (-(-m // cfg.block_m),)  # (triton.cdiv is a constexpr function: 2 µs a call)
        FWD_ROWS.launch(grid, (*ptrs, *scalars, gate if gate is not None else x),
                        {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "PARTIAL": spec.k < n,
                         "num_warps": cfg.num_warps, **flags, **_gate_consts(spec, gate is not None),
                         "STORE_RSTD": True, "GROUP_PERIOD": period}, x.device)
    elif cfg.team:
        g = _check_team(cfg, n)
        part = torch.empty((m * g,), dtype=torch.float32, device=x.device)
        arr, gen = _barrier_state(x.device)
        consts = {"CHUNK": cfg.block_n, "GMAX": TEAM_MAX, "PARTIAL": spec.k < n, "num_warps": cfg.num_warps, **flags}
        teams = cfg.programs // g if cfg.programs else _teams(kernels._fwd_team, (*ptrs, part, arr, gen, *scalars),
                                                              consts, g, m, x.device)
        for sync in _team_launches(x.device, g):
            FWD_TEAM.launch((teams * g,), (*ptrs, part, arr, gen, *scalars, teams, g), {"SYNC": sync, **consts},
                            x.device)
    else:
        ev = ("evict_last", "evict_first") if cfg.evict else ("", "")
        grid = (min(m, cfg.programs) if cfg.programs else m,)
        FWD_LOOPED.launch(grid, (*ptrs, *scalars), {"BLOCK_N": cfg.block_n, "num_warps": cfg.num_warps,
                                                    "EV1": ev[0], "EV2": ev[1], **flags}, x.device)
    return y, h, rstd


def _check_team(cfg: FwdConfig | BwdConfig, n: int) -> int:
    if not 1 <= cfg.team <= TEAM_MAX or cfg.block_n * cfg.team < n:
        raise ValueError(f"team config {cfg} cannot cover rows of {n}: need 1 <= team <= {TEAM_MAX} and "
                         "team * block_n >= N")
    return cfg.team


def _team_launches(device: torch.device, g: int) -> tuple[bool, ...]:
    """One synchronised launch on a GPU. The interpreter runs programs one after another, so a team of
    g > 1 cannot meet at a barrier there: it launches twice without it, the second launch reading the
    partial statistics the first wrote (same values), which tests everything but the barrier itself."""
    return (True,) if device.type == "cuda" or g == 1 else (False, False)


_TEAM_CAPACITY: dict[tuple, int] = {}


def _teams(kernel, args: tuple, consts: dict, g: int, rows: int, device: torch.device) -> int:
    """Co-resident team count for this kernel specialisation (compiled once to read its register count)."""
    if device.type != "cuda":
        return max(1, min(rows, 2))
    key = (kernel.fn.__name__, device.index, tuple(sorted((k, str(v)) for k, v in consts.items())),
           tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    cap = _TEAM_CAPACITY.get(key)
    if cap is None:
        compiled = kernel.warmup(*args, 3, g, grid=(1,), **consts)  # teams=3: no int specialisation
        if hasattr(compiled, "_init_handles"):
            compiled._init_handles()
        cap = _TEAM_CAPACITY[key] = team_grid(compiled, consts["num_warps"], sm_count(device), g, 1 << 30, device)
    return max(1, min(cap, rows))


def backward(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
             rstd: torch.Tensor, spec: Spec, need_dw: bool, need_db: bool, config: BwdConfig | None = None,
             gate: torch.Tensor | None = None, bias: torch.Tensor | None = None, dz: torch.Tensor | None = None,
             period: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dw in the weight's dtype, db in fp32) of (M, N) rows. A gated call (``gate``, with h = x) also
    writes the gate's gradient into ``dz`` and needs the ``bias`` (row kernel only). ``period`` as the
    forward's: dw and db then have period * N elements."""
    m, n = h.shape
    dx = torch.empty((m, n), dtype=h.dtype, device=h.device)
    cfg = config or bwd_config(m, n, sm_count(h.device), h.element_size())
    if period > 1 and cfg.single:
        cfg = grouped_bwd_config(cfg, period)
    f32: dict = {"dtype": torch.float32, "device": h.device}
    pn = n * period  # elements of the gain
    if m == 0:  # two tensors: dW and db must not share storage
        return dx, (torch.zeros((pn,), **f32) if need_dw else None), (torch.zeros((pn,), **f32) if need_db else None)
    w = weight.contiguous() if weight is not None else h
    d = dh if dh is not None else h
    flags = {"HAS_DH": dh is not None, "HAS_W": weight is not None, "NEED_DW": need_dw, "NEED_DB": need_db,
             "PARTIAL": spec.k < n, "EPS_OUTSIDE": spec.eps_outside, "ROUND_TY": _round_ty(spec)}
    strides = (dy.stride(0), d.stride(0), h.stride(0))
    scalars = (m, n, spec.k, spec.eps, spec.offset)
    if (gate is not None or period > 1) and not cfg.single:
        raise ValueError(f"gated or grouped rows of {n} elements need the row kernel; config {cfg} is not one")
    if cfg.team:
        g = _check_team(cfg, n)
        part = torch.empty((m * g,), **f32)
        arr, gen = _barrier_state(h.device)
        consts = {"CHUNK": cfg.block_n, "GMAX": TEAM_MAX, "num_warps": cfg.num_warps, **flags}
        probe = (dy, d, h, w, rstd, dx, rstd, rstd, part, arr, gen, *strides, *scalars)
        teams = cfg.programs // g if cfg.programs else _teams(kernels._bwd_team, probe, consts, g, m, h.device)
        dwp = torch.empty((teams, n), **f32) if need_dw else None
        dbp = torch.empty((teams, n), **f32) if need_db else None
        parts = (dwp if dwp is not None else rstd, dbp if dbp is not None else rstd)
        for sync in _team_launches(h.device, g):
            BWD_TEAM.launch((teams * g,), (dy, d, h, w, rstd, dx, *parts, part, arr, gen, *strides, *scalars,
                                           teams, g), {"SYNC": sync, **consts}, h.device)
    else:
        programs = cfg.programs
        # every program writes its whole partial row, except the in-place (L2 partials) variant: zero it
        alloc = torch.empty if (cfg.acc_in_regs or not cfg.single) else torch.zeros
        dwp = alloc((programs, pn), **f32) if need_dw else None
        dbp = alloc((programs, pn), **f32) if need_db else None
        parts = (dwp if dwp is not None else rstd, dbp if dbp is not None else rstd)
        if cfg.single:
            gated = gate is not None and dz is not None
            BWD_ROWS.launch((programs,), (dy, d, h, w, rstd, dx, *parts, *strides, *scalars,
                                          gate if gated else h, dz if gated else dx, bias if bias is not None else h),
                            {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "ACC_IN_REGS": cfg.acc_in_regs,
                             "num_warps": cfg.num_warps, **flags, **_gate_consts(spec, gated),
                             "HAS_B": bias is not None, "GROUP_PERIOD": period}, h.device)
        else:
            s = torch.empty((m,), **f32)
            BWD_ROWDOT.launch((m,), (dy, h, w, s, dy.stride(0), h.stride(0), n, spec.offset),
                              {"BLOCK_N": cfg.block_n, "HAS_W": weight is not None, "num_warps": cfg.num_warps},
                              h.device)
            grid = (triton.cdiv(n, cfg.block_n), programs)
            BWD_TILED.launch(grid, (dy, d, h, w, rstd, s, dx, *parts, *strides, *scalars),
                             {"BLOCK_N": cfg.block_n, "num_warps": cfg.num_warps, **flags}, h.device)
    # in the weight's dtype on a GPU; in fp32 under the interpreter, whose fp32 -> bf16 stores truncate (the
    # caller's .to() then rounds to nearest, as the GPU's store does)
    dw_dtype = weight.dtype if weight is not None and h.device.type in prebound.DEVICES else torch.float32
    dw = _sum_partials(dwp, dw_dtype) if dwp is not None else None
    db = _sum_partials(dbp, torch.float32) if dbp is not None else None
    return dx, dw, db


SUM_BLOCK = 1024


def _sum_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The column sums of per-program fp32 partials (rows in order: deterministic), in ``dtype``."""
    rows, n = part.shape
    if rows == 1 and dtype == torch.float32:
        return part.view(n)
    out = torch.empty((n,), dtype=dtype, device=part.device)
    SUM_PARTIALS.launch((-(-n // SUM_BLOCK),), (part, out, rows, n), {"BLOCK_N": SUM_BLOCK, "num_warps": 4},
                        part.device)
    return out
