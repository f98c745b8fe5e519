"""Triton kernels: one forward and one backward kernel per memory strategy, every variant a constexpr flag.

Math as in :mod:`rmsnorm.reference`. All statistics in fp32; offsets in int64; rows may carry a stride
(the last dimension is contiguous); outputs are contiguous. Flags: HAS_R (residual: h = x + r is
stored and normalized), HAS_W / HAS_B (gain, bias), PARTIAL (k < N), EPS_OUTSIDE, ROUND_TY (the dtype
the normalized row is rounded through before the gain: the spec's ``round_to``, fp32 for none, which
compiles to nothing), and in the backward HAS_DH, NEED_DW, NEED_DB. NORM_TY is h's dtype.

Strategies (chosen by heuristics.py):
- forward ``_fwd_rows``: a [BLOCK_M, BLOCK_N] tile of whole rows in registers: one read, one write.
- forward ``_fwd_looped``: one row per program, looping over BLOCK_N columns twice (huge N).
- backward ``_bwd_rows``: persistent programs over row blocks held in registers, dW/db accumulated in fp32
  registers and written once per program as (programs, N) partials (summed in a fixed order, no atomics).
- backward ``_bwd_rowdot`` + ``_bwd_tiled``: per-row dot products first, then column tiles over rows
  (huge N), again with per-program partials.
- forward ``_fwd_team`` / backward ``_bwd_team``: split-row "team" kernels for wide rows. A persistent grid
  of teams of G programs; each program holds one CHUNK of the row in registers, writes its partial
  statistic to a (rows, G) buffer, meets its team at a barrier (``_team_sync``), sums the G partials in a
  fixed order (deterministic) and finishes its chunk: one read and one write per element (forward), two
  reads and one write (backward), whatever N. The next row is loaded before the barrier so the wait
  overlaps memory traffic. Every program of the grid must be resident at once (the launcher sizes the
  grid from occupancy); the interpreter runs programs one after another, so there only G = 1 can run.
- forward ``_fwd_looped`` with EVICT: the two-pass fallback with a persistent grid small enough that the
  rows in flight stay in L2 between the passes (first pass evict_last, second evict_first).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _inv_rms(ss, K, eps, EPS_OUTSIDE: tl.constexpr):
    ms = ss / K
    if EPS_OUTSIDE:
        return tl.div_rn(1.0, tl.sqrt_rn(ms) + eps)
    return tl.div_rn(1.0, tl.sqrt_rn(ms + eps))


@triton.jit
def _finish_row(x, rstd, W, B, cols, cmask, offset, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                ROUND_TY: tl.constexpr):
    y = (x * rstd).to(ROUND_TY).to(tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        y = y * w
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y + b
    return y


@triton.jit
def _param_cols(rows, cols, N, GROUP_PERIOD: tl.constexpr):
    """[BLOCK_M, BLOCK_N] (or [1, BLOCK_N]) offsets of the gain and bias for these rows' columns."""
    if GROUP_PERIOD > 1:
        return (rows % GROUP_PERIOD).to(tl.int64)[:, None] * N + cols[None, :]
    return cols[None, :]


@triton.jit
def _act(z, ACT: tl.constexpr):
    """The gate's activation on fp32 z with torch's formulas: silu z / (1 + exp(-z)) (ACT 0), sigmoid (1)."""
    e = 1.0 + tl.exp(-z)
    if ACT == 0:
        return z / e
    return 1.0 / e


@triton.jit
def _act_slope(z, ACT: tl.constexpr):
    """act'(z): silu' = s (1 + z (1 - s)), sigmoid' = s (1 - s), s = sigmoid(z)."""
    sg = 1.0 / (1.0 + tl.exp(-z))
    if ACT == 0:
        return sg * (1.0 + z * (1.0 - sg))
    return sg * (1.0 - sg)


@triton.jit
def _fwd_rows(X, R, W, B, Y, H, RSTD, stride_x, stride_r, M, N, K, eps, offset, Z,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr,
              HAS_B: tl.constexpr, PARTIAL: tl.constexpr, EPS_OUTSIDE: tl.constexpr, ROUND_TY: tl.constexpr,
              NORM_TY: tl.constexpr, GATE: tl.constexpr = 0, ACT: tl.constexpr = 0,
              GATE_ROUND_TY: tl.constexpr = tl.float32, STORE_RSTD: tl.constexpr = True,
              GROUP_PERIOD: tl.constexpr = 1, RSTD_TY: tl.constexpr = tl.float32):
    """GATE (rows of N, contiguous Z): 1 normalizes x * act(z), 2 multiplies the output by act(z) after
    rounding it through GATE_ROUND_TY. STORE_RSTD False: no backward will follow (RSTD is not written).
    GROUP_PERIOD > 1: the rows are groups of N elements, GROUP_PERIOD of them to a row of the call, and row r
    takes the gain and bias at columns (r % GROUP_PERIOD) * N + cols. RSTD_TY (every forward kernel): 1/r is
    rounded through it before it multiplies (cast "rstd"; fp32: not rounded)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    # The row stays in registers in its storage dtype (half the registers for bf16/fp16) and is converted
    # to fp32 where used, so wide rows fit without spilling.
    xr = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_R:
        r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xr = (xr.to(tl.float32) + r).to(NORM_TY)
        tl.store(H + r64 * N + cols[None, :], xr, mask=mask)
    hf = xr.to(tl.float32)
    if GATE != 0:
        a = _act(tl.load(Z + r64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32), ACT)
        if GATE == 1:
            hf = hf * a
    xs = hf
    if PARTIAL:
        xs = tl.where(cols[None, :] < K, xs, 0.0)
    rstd = _inv_rms(tl.sum(xs * xs, axis=1), K, eps, EPS_OUTSIDE)
    if STORE_RSTD:
        tl.store(RSTD + rows, rstd, mask=rmask)
    y = _finish_row(hf, rstd.to(RSTD_TY).to(tl.float32)[:, None], W, B, _param_cols(rows, cols, N, GROUP_PERIOD),
                    cmask[None, :], offset, HAS_W, HAS_B, ROUND_TY)
    if GATE == 2:
        y = y.to(GATE_ROUND_TY).to(tl.float32) * a
    tl.store(Y + r64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_looped(X, R, W, B, Y, H, RSTD, stride_x, stride_r, M, N, K, eps, offset,
                BLOCK_N: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                EPS_OUTSIDE: tl.constexpr, ROUND_TY: tl.constexpr, NORM_TY: tl.constexpr, EV1: tl.constexpr,
                EV2: tl.constexpr, RSTD_TY: tl.constexpr = tl.float32):
    """Rows pid, pid + programs, ...; each row read twice (statistic, then output). EV1 / EV2: L2 eviction
    hints of the two passes ("evict_last" / "evict_first" to keep the rows in flight in L2, or "")."""
    base = tl.arange(0, BLOCK_N)
    for row_i in range(tl.program_id(0), M, tl.num_programs(0)):
        row = tl.cast(row_i, tl.int64)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_R:
            for c in range(0, N, BLOCK_N):
                cols = c + base
                m = cols < N
                x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
                r = tl.load(R + row * stride_r + cols, mask=m, other=0.0).to(tl.float32)
                hq = (x + r).to(NORM_TY)
                tl.store(H + row * N + cols, hq, mask=m, eviction_policy=EV1)
                hf = tl.where(cols < K, hq.to(tl.float32), 0.0)
                acc += hf * hf
        else:
            for c in range(0, K, BLOCK_N):
                cols = c + base
                x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0, eviction_policy=EV1)
                x = x.to(tl.float32)
                acc += x * x
        rstd = _inv_rms(tl.sum(acc, axis=0), K, eps, EPS_OUTSIDE)
        tl.store(RSTD + row, rstd)
        scale = rstd.to(RSTD_TY).to(tl.float32)
        # second pass backwards: the chunks read last are the likeliest to still be in L2
        steps = tl.cdiv(N, BLOCK_N)
        for i in range(0, steps):
            cols = (steps - 1 - i) * BLOCK_N + base
            m = cols < N
            if HAS_R:
                x = tl.load(H + row * N + cols, mask=m, other=0.0, eviction_policy=EV2).to(tl.float32)
            else:
                x = tl.load(X + row * stride_x + cols, mask=m, other=0.0, eviction_policy=EV2).to(tl.float32)
            y = _finish_row(x, scale, W, B, cols, m, offset, HAS_W, HAS_B, ROUND_TY)
            tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=m, eviction_policy="evict_first")


@triton.jit
def _stat_grad_coef(rstd, K, eps, EPS_OUTSIDE: tl.constexpr):
    """d rstd / d h_i = -coef * h_i for i < k: rstd^3/k (inside), rstd^2/(k*sqrt(ms)) (outside; 0 at 0)."""
    if EPS_OUTSIDE:
        root = 1.0 / rstd - eps
        return tl.where(root > 0, rstd * rstd / (K * tl.maximum(root, 1e-30)), 0.0)
    return rstd * rstd * rstd / K


@triton.jit
def _dw_term(hf, dyf, rstd, ROUND_TY: tl.constexpr):
    """A row's contribution to dW: dy * (h * rstd rounded through ROUND_TY)."""
    return dyf * (hf * rstd).to(ROUND_TY).to(tl.float32)


@triton.jit
def _bwd_rows(DY, DH, Hp, W, RSTD, DX, DWP, DBP, stride_dy, stride_dh, stride_h, M, N, K, eps, offset, Z, DZ, B,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DH: tl.constexpr, HAS_W: tl.constexpr,
              NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, PARTIAL: tl.constexpr, EPS_OUTSIDE: tl.constexpr,
              ROUND_TY: tl.constexpr, ACC_IN_REGS: tl.constexpr, GATE: tl.constexpr = 0, ACT: tl.constexpr = 0,
              GATE_ROUND_TY: tl.constexpr = tl.float32, HAS_B: tl.constexpr = False,
              GROUP_PERIOD: tl.constexpr = 1):
    """Persistent programs over row blocks. ACC_IN_REGS: the gain and the dW/db accumulators live in
    registers for the program's lifetime; else (wide rows) the gain is re-read per row block and the
    program's own partial row in DWP/DBP (L2-resident) is updated in place: fewer registers, no spills.
    GATE (Z, DZ rows of N; h is x; B the bias for "after"): 1: h' = x * a is normalized, dx = d * a,
    dz = d * x * act'(z); 2: dy' = dy * a goes into the norm, dz = dy * u * act'(z) with u recomputed.
    GROUP_PERIOD > 1 (as the forward's) needs ACC_IN_REGS False and BLOCK_M dividing GROUP_PERIOD, so that
    the rows of a block update distinct columns of the program's partial row of GROUP_PERIOD * N."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    part = pid.to(tl.int64) * N + cols
    if ACC_IN_REGS:
        if HAS_W:
            g = (tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset)[None, :]
        # [BLOCK_M, BLOCK_N] accumulators: summed over rows once at the end, not once per row block
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for rb in range(pid, tl.cdiv(M, BLOCK_M), programs):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        h = tl.load(Hp + r64 * stride_h + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=1.0)
        pcols = _param_cols(rows, cols, N, GROUP_PERIOD)
        if not ACC_IN_REGS and HAS_W:
            g = tl.load(W + pcols, mask=cmask[None, :], other=0.0).to(tl.float32) + offset
        hf = h.to(tl.float32)
        dyf = dy.to(tl.float32)
        if GATE != 0:
            zf = tl.load(Z + r64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            a = _act(zf, ACT)
            if GATE == 1:
                xf = hf
                hf = hf * a
            else:
                dy_raw = dyf
                dyf = dyf * a
        dyg = dyf
        if HAS_W:
            dyg = dyg * g
        s = tl.sum(dyg * hf, axis=1)
        cs = _stat_grad_coef(rstd, K, eps, EPS_OUTSIDE) * s
        corr = hf * cs[:, None]
        if PARTIAL:
            corr = tl.where(cols[None, :] < K, corr, 0.0)
        dx = dyg * rstd[:, None] - corr
        if HAS_DH:
            dx += tl.load(DH + r64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xh = (hf * rstd[:, None]).to(ROUND_TY).to(tl.float32)
        if GATE == 1:
            tl.store(DZ + r64 * N + cols[None, :], (dx * xf * _act_slope(zf, ACT)).to(DZ.dtype.element_ty),
                     mask=mask)
            dx = dx * a
        if GATE == 2:
            u = xh
            if HAS_W:
                u = u * g
            if HAS_B:
                u = u + tl.load(B + pcols, mask=cmask[None, :], other=0.0).to(tl.float32)
            u = u.to(GATE_ROUND_TY).to(tl.float32)
            tl.store(DZ + r64 * N + cols[None, :], (dy_raw * u * _act_slope(zf, ACT)).to(DZ.dtype.element_ty),
                     mask=mask)
        tl.store(DX + r64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            if ACC_IN_REGS:
                dw_acc += dyf * xh
            elif GROUP_PERIOD > 1:  # each row of the block to its own columns of the partial row
                gp = pid.to(tl.int64) * N * GROUP_PERIOD + pcols
                tl.store(DWP + gp, tl.load(DWP + gp, mask=mask) + dyf * xh, mask=mask)
            else:
                tl.store(DWP + part, tl.load(DWP + part, mask=cmask) + tl.sum(dyf * xh, axis=0), mask=cmask)
        if NEED_DB:
            if ACC_IN_REGS:
                db_acc += dyf
            elif GROUP_PERIOD > 1:
                gp = pid.to(tl.int64) * N * GROUP_PERIOD + pcols
                tl.store(DBP + gp, tl.load(DBP + gp, mask=mask) + dyf, mask=mask)
            else:
                tl.store(DBP + part, tl.load(DBP + part, mask=cmask) + tl.sum(dyf, axis=0), mask=cmask)
    if ACC_IN_REGS:
        if NEED_DW:
            tl.store(DWP + part, tl.sum(dw_acc, axis=0), mask=cmask)
        if NEED_DB:
            tl.store(DBP + part, tl.sum(db_acc, axis=0), mask=cmask)


@triton.jit
def _bwd_rowdot(DY, Hp, W, S, stride_dy, stride_h, N, offset, BLOCK_N: tl.constexpr, HAS_W: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c in range(0, N, BLOCK_N):
        cols = c + base
        m = cols < N
        h = tl.load(Hp + row * stride_h + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            dy = dy * (tl.load(W + cols, mask=m, other=0.0).to(tl.float32) + offset)
        acc += dy * h
    tl.store(S + row, tl.sum(acc, axis=0))


@triton.jit
def _bwd_tiled(DY, DH, Hp, W, RSTD, S, DX, DWP, DBP, stride_dy, stride_dh, stride_h, M, N, K, eps, offset,
               BLOCK_N: tl.constexpr, HAS_DH: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr,
               NEED_DB: tl.constexpr, PARTIAL: tl.constexpr, EPS_OUTSIDE: tl.constexpr, ROUND_TY: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gid = tl.program_id(1)
    groups = tl.num_programs(1)
    cmask = cols < N
    if HAS_W:
        g = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(gid, M, groups):
        r64 = tl.cast(row, tl.int64)
        h = tl.load(Hp + r64 * stride_h + cols, mask=cmask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols, mask=cmask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        dyg = dy
        if HAS_W:
            dyg = dy * g
        corr = h * (_stat_grad_coef(rstd, K, eps, EPS_OUTSIDE) * tl.load(S + row))
        if PARTIAL:
            corr = tl.where(cols < K, corr, 0.0)
        dx = dyg * rstd - corr
        if HAS_DH:
            dx += tl.load(DH + r64 * stride_dh + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * N + cols, dx.to(DX.dtype.element_ty), mask=cmask)
        if NEED_DW:
            dw_acc += _dw_term(h, dy, rstd, ROUND_TY)
        if NEED_DB:
            db_acc += dy
    if NEED_DW:
        tl.store(DWP + gid.to(tl.int64) * N + cols, dw_acc, mask=cmask)
    if NEED_DB:
        tl.store(DBP + gid.to(tl.int64) * N + cols, db_acc, mask=cmask)


@triton.jit
def _sum_partials(P, OUT, ROWS, N, BLOCK_N: tl.constexpr):
    """OUT[j] = sum of P[r, j] over the ROWS partial rows, in row order (deterministic), accumulated in fp32
    and stored once in OUT's dtype (the parameter's: no separate cast)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = cols < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    p = P + cols
    for _ in range(ROWS):
        acc += tl.load(p, mask=m, other=0.0)
        p += N  # pointer arithmetic: 64-bit, rows * N may pass 2^31
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _team_sync(ARR, GEN, team, G, SYNC: tl.constexpr):
    """Barrier of the G programs of one team: a generation counter, so it resets itself (CUDA-graph safe).

    Every program reads the generation, arrives (acq_rel); the last to arrive resets the arrival count and
    publishes the next generation (release); the others spin until they see it (acquire). The CTA
    barriers before and after order the whole program's stores and loads around the one thread's atomics.
    """
    if SYNC:
        tl.debug_barrier()
        gen0 = tl.atomic_add(GEN + team, 0, sem="relaxed")
        arrived = tl.atomic_add(ARR + team, 1, sem="acq_rel")
        if arrived == G - 1:
            tl.atomic_xchg(ARR + team, 0, sem="relaxed")
            tl.atomic_add(GEN + team, 1, sem="release")
        else:
            seen = gen0
            while seen == gen0:
                seen = tl.atomic_add(GEN + team, 0, sem="acquire")
        tl.debug_barrier()


@triton.jit
def _fwd_team(X, R, W, B, Y, H, RSTD, PART, ARR, GEN, stride_x, stride_r, M, N, K, eps, offset, teams, G,
              CHUNK: tl.constexpr, GMAX: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              PARTIAL: tl.constexpr, EPS_OUTSIDE: tl.constexpr, ROUND_TY: tl.constexpr, NORM_TY: tl.constexpr,
              SYNC: tl.constexpr = True, RSTD_TY: tl.constexpr = tl.float32):
    """Split-row forward: team t of G programs handles rows t, t + teams, ...; program g owns columns
    [g*CHUNK, (g+1)*CHUNK). PART[row, g] holds the chunk's sum of squares. G is a run-time argument
    (G <= GMAX), so one compiled kernel serves every N of a chunk size."""
    pid = tl.program_id(0)
    team = pid // G
    g = pid % G
    cols = g * CHUNK + tl.arange(0, CHUNK)
    cmask = cols < N
    steps = tl.cdiv(M, teams)
    row = team.to(tl.int64)
    xr = tl.load(X + row * stride_x + cols, mask=cols < tl.where(row < M, N, 0), other=0.0)
    if HAS_R:
        rr = tl.load(R + row * stride_r + cols, mask=cols < tl.where(row < M, N, 0), other=0.0)
    for j in range(0, steps):
        row = team.to(tl.int64) + j * teams
        valid = row < M
        if HAS_R:
            xr = (xr.to(tl.float32) + rr.to(tl.float32)).to(NORM_TY)
            tl.store(H + row * N + cols, xr, mask=cols < tl.where(valid, N, 0))
        xs = xr.to(tl.float32)
        if PARTIAL:
            xs = tl.where(cols < K, xs, 0.0)
        tl.store(PART + row * G + g, tl.sum(xs * xs, axis=0), mask=valid)
        # the next row's chunk is requested before the barrier: the wait overlaps its loads
        nxt = row + teams
        xn = tl.load(X + nxt * stride_x + cols, mask=cols < tl.where(nxt < M, N, 0), other=0.0)
        if HAS_R:
            rr = tl.load(R + nxt * stride_r + cols, mask=cols < tl.where(nxt < M, N, 0), other=0.0)
        _team_sync(ARR, GEN, team, G, SYNC)
        parts = tl.load(PART + row * G + tl.arange(0, GMAX), mask=tl.arange(0, GMAX) < tl.where(valid, G, 0), other=0.0,
                        cache_modifier=".cg")
        rstd = _inv_rms(tl.sum(parts, axis=0), K, eps, EPS_OUTSIDE)
        tl.store(RSTD + row, rstd, mask=valid & (g == 0))
        y = _finish_row(xr.to(tl.float32), rstd.to(RSTD_TY).to(tl.float32), W, B, cols, cmask, offset, HAS_W, HAS_B,
                        ROUND_TY)
        tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=cols < tl.where(valid, N, 0))
        xr = xn


@triton.jit
def _bwd_team(DY, DH, Hp, W, RSTD, DX, DWP, DBP, PART, ARR, GEN, stride_dy, stride_dh, stride_h, M, N, K, eps,
              offset, teams, G, CHUNK: tl.constexpr, GMAX: tl.constexpr, HAS_DH: tl.constexpr, HAS_W: tl.constexpr,
              NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, PARTIAL: tl.constexpr, EPS_OUTSIDE: tl.constexpr,
              ROUND_TY: tl.constexpr, SYNC: tl.constexpr = True):
    """Split-row backward: as _fwd_team, PART[row, g] holding the chunk's part of sum(dy * g * h). dW/db
    accumulate in registers over the team's rows and are written once as (teams, N) partials."""
    pid = tl.program_id(0)
    team = pid // G
    g = pid % G
    cols = g * CHUNK + tl.arange(0, CHUNK)
    cmask = cols < N
    if HAS_W:
        gw = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([CHUNK], dtype=tl.float32)
    db_acc = tl.zeros([CHUNK], dtype=tl.float32)
    steps = tl.cdiv(M, teams)
    row = team.to(tl.int64)
    h = tl.load(Hp + row * stride_h + cols, mask=cols < tl.where(row < M, N, 0), other=0.0)
    dy = tl.load(DY + row * stride_dy + cols, mask=cols < tl.where(row < M, N, 0), other=0.0)
    for j in range(0, steps):
        row = team.to(tl.int64) + j * teams
        valid = row < M
        rstd = tl.load(RSTD + row, mask=valid, other=1.0)
        hf = h.to(tl.float32)
        dyf = dy.to(tl.float32)
        dyg = dyf
        if HAS_W:
            dyg = dyf * gw
        tl.store(PART + row * G + g, tl.sum(dyg * hf, axis=0), mask=valid)
        nxt = row + teams
        hn = tl.load(Hp + nxt * stride_h + cols, mask=cols < tl.where(nxt < M, N, 0), other=0.0)
        dyn = tl.load(DY + nxt * stride_dy + cols, mask=cols < tl.where(nxt < M, N, 0), other=0.0)
        _team_sync(ARR, GEN, team, G, SYNC)
        parts = tl.load(PART + row * G + tl.arange(0, GMAX), mask=tl.arange(0, GMAX) < tl.where(valid, G, 0), other=0.0,
                        cache_modifier=".cg")
        cs = _stat_grad_coef(rstd, K, eps, EPS_OUTSIDE) * tl.sum(parts, axis=0)
        corr = hf * cs
        if PARTIAL:
            corr = tl.where(cols < K, corr, 0.0)
        dx = dyg * rstd - corr
        if HAS_DH:
            dx += tl.load(DH + row * stride_dh + cols, mask=cols < tl.where(valid, N, 0), other=0.0).to(tl.float32)
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=cols < tl.where(valid, N, 0))
        if NEED_DW:
            dw_acc += _dw_term(hf, dyf, rstd, ROUND_TY)
        if NEED_DB:
            db_acc += dyf
        h = hn
        dy = dyn
    if NEED_DW:
        tl.store(DWP + team.to(tl.int64) * N + cols, dw_acc, mask=cmask)
    if NEED_DB:
        tl.store(DBP + team.to(tl.int64) * N + cols, db_acc, mask=cmask)
