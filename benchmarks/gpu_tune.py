"""Tune the Triton kernels on one GPU: every candidate design checked, then timed against the copy roofline,
torch's F.rms_norm, torch.compile(F.rms_norm) and Liger; writes JSONL and the table heuristics.py reads.

    PYTHONPATH=src python benchmarks/gpu_tune.py --out DIR [--budget 300] [--table PATH] [--smoke]

Layout of the run (one "unit" per pass x dtype x N, rows of M*N = 2^27 elements):
1. For each candidate launch configuration (the current heuristic pick, split-row team kernels over chunk
   sizes and warps, the L2-resident two-pass forward): one call at the timed shape and one at a small odd
   shape, compared with the reference backend (fp32 math); a "begin" line is written before each call.
2. The candidates that passed, the copy (``x.clone()``) and the references (torch F.rms_norm, Liger where it
   runs, torch.compile(F.rms_norm) for bf16 while time remains), timed round-robin with CUDA events.
3. The fastest passing candidate per (pass, element size, N) goes into the table (``--table``, by default
   src/rmsnorm/backends/triton/tuned.json), with the card and the date.

A watchdog runs the work in a child process. The team kernels' programs wait for each other, so a grid
that is not co-resident would hang: a child that writes nothing for --stall seconds is killed, the
candidate it had begun is recorded as hung, and a new child resumes after it (finished units are kept).
``--smoke`` runs tiny shapes on CPU tensors in Triton's interpreter (tests the script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TOTAL = 1 << 27
NS = [1024, 4096, 8192, 16384, 32768, 65536, 131072, 262144]
FWD_TEAM = [(4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16), (16384, 32)]  # (chunk, warps)
BWD_TEAM = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]
FWD_TEAM_MIN_N, BWD_TEAM_MIN_N, L2_MIN_N = 16384, 8192, 65536
EPS = 1e-6
# Allowed error against the reference backend, in units of the output dtype's epsilon x max(|ref|, 1):
# (forward y, backward dx). The interpreter truncates bf16 casts (1 ulp more).
TOL = {"bf16": (2.0, 4.0), "fp32": (8.0, 64.0)}


# ----------------------------------------------------------------------------------------------- candidates
def candidates(kind: str, m: int, n: int, itemsize: int, sms: int, l2_bytes: int, smoke: bool) -> dict:
    """label -> config for one (pass, N, element size)."""
    from rmsnorm.backends.triton.heuristics import BwdConfig, FwdConfig, bwd_config, fwd_config, team_size

    out: dict = {}
    if kind == "fwd":
        out["default"] = fwd_config(m, n, itemsize, table={})
        if smoke:
            out["team c32 w4"] = FwdConfig(1, 32, 4, False, team=team_size(n, 32))
            out["l2 b32 p3"] = FwdConfig(1, 32, 4, False, programs=3, evict=True)
            return out
        if n >= FWD_TEAM_MIN_N:
            for chunk, warps in FWD_TEAM:
                if chunk <= n // 2 and n // chunk <= 64:
                    out[f"team c{chunk} w{warps}"] = FwdConfig(1, chunk, warps, False, team=team_size(n, chunk))
        if n >= L2_MIN_N:
            for frac in (0.5, 1.0):  # rows in flight: half the L2, all of it
                programs = max(1, int(frac * l2_bytes) // (n * itemsize))
                out[f"l2 b8192 w16 rows{programs}"] = FwdConfig(1, 8192, 16, False, programs=programs, evict=True)
        return out
    out["default"] = bwd_config(m, n, sms, itemsize, table={})
    if smoke:
        out["team c32 w4"] = BwdConfig(1, 32, 4, False, 0, team=team_size(n, 32))
        return out
    if n >= BWD_TEAM_MIN_N:
        for chunk, warps in BWD_TEAM:
            if chunk <= n // 2 and n // chunk <= 64:
                out[f"team c{chunk} w{warps}"] = BwdConfig(1, chunk, warps, False, 0, team=team_size(n, chunk))
    return out


def table_entry(label: str, cfg) -> dict:
    if label == "default":
        return {"kind": "default"}
    if cfg.team:
        return {"kind": "team", "block_n": cfg.block_n, "num_warps": cfg.num_warps}
    return {"kind": "looped", "block_n": cfg.block_n, "num_warps": cfg.num_warps, "programs": cfg.programs,
            "evict": cfg.evict}


# ------------------------------------------------------------------------------------------------- the child
class Log:
    def __init__(self, path: Path) -> None:
        self.fh = path.open("a")

    def __call__(self, **row) -> None:
        row["t"] = round(time.time(), 2)
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()


def _close(a, b, tol_ulps: float) -> tuple[bool, float]:
    """max |a - b| in units of b's dtype epsilon times max(|b|, 1)."""
    import torch

    eps = torch.finfo(a.dtype).eps
    err = ((a.double() - b.double()).abs() / (b.double().abs().clamp_min(1.0) * eps)).max().item() if a.numel() else 0
    return err <= tol_ulps, err


def child(args) -> int:
    import torch

    from rmsnorm.backends.triton import launch
    from rmsnorm.bench.timing import measure_group
    from rmsnorm.spec import Spec

    smoke = args.smoke
    dev = "cpu" if smoke else "cuda"
    log = Log(args.out / "tune.jsonl")
    done = set()
    hung = set()
    for line in (args.out / "tune.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("type") == "unit_done":
            done.add(r["unit"])
        if r.get("type") == "hung":
            hung.add((r["unit"], r["label"]))
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        sms, l2 = props.multi_processor_count, getattr(props, "L2_cache_size", 50 << 20)
        if not done:
            log(type="meta", card=props.name, sms=sms, l2_bytes=l2, torch=torch.__version__,
                triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    else:
        sms, l2 = 4, 1 << 16
        if not done:
            log(type="meta", card="CPU (Triton interpreter smoke run)", sms=sms, l2_bytes=l2, torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    total, ns = (1 << 11, [128]) if smoke else (TOTAL, NS)
    deadline = args.start + args.budget
    refs = references(dev, smoke)
    for dname, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for n in ns:
            for kind in ("fwd", "bwd"):
                unit = f"{kind}/{dname}/{n}"
                if unit in done:
                    continue
                if time.time() > deadline:
                    log(type="skipped", unit=unit, why="out of time")
                    continue
                m = total // n
                g = torch.Generator(device=dev).manual_seed(n)
                x = torch.randn(m, n, device=dev, dtype=dtype, generator=g)
                w = (1 + 0.1 * torch.randn(n, device=dev, dtype=dtype, generator=g))
                dy = torch.randn(m, n, device=dev, dtype=dtype, generator=g)
                spec = Spec(1, n, EPS, False, 0.0, None, dtype, False)
                import rmsnorm

                y_ref = rmsnorm.rms_norm(x, w, eps=EPS, backend="reference")
                _, _, rstd = launch.forward(x, w, None, None, spec, config=None)
                if kind == "bwd":
                    xr = x.detach().requires_grad_(True)
                    wr = w.detach().requires_grad_(True)
                    dx_ref, dw_ref = torch.autograd.grad(rmsnorm.rms_norm(xr, wr, eps=EPS, backend="reference"),
                                                         (xr, wr), dy)
                cands = candidates(kind, m, n, dtype.itemsize, sms, l2, smoke)
                fns = {"copy": lambda x=x: x.clone()}
                for label, cfg in cands.items():
                    if (unit, label) in hung:
                        continue
                    log(type="begin", unit=unit, label=label)
                    if os.environ.get("GPU_TUNE_TEST_HANG") == f"{unit} {label}":  # tests the watchdog
                        time.sleep(3600)
                    try:
                        if kind == "fwd":
                            fn = (lambda cfg=cfg, x=x, w=w, spec=spec:
                                  launch.forward(x, w, None, None, spec, config=cfg))
                            y = fn()[0]
                            ok, err = _close(y, y_ref, TOL[dname][0])
                        else:
                            fn = (lambda cfg=cfg, x=x, w=w, dy=dy, rstd=rstd, spec=spec:
                                  launch.backward(dy, None, x, w, rstd, spec, True, False, config=cfg))
                            dx, dw, _ = fn()
                            ok1, e1 = _close(dx, dx_ref, TOL[dname][1])
                            # dW sums M rows in fp32 in another order than the reference: relative to its scale
                            e2 = ((dw.double() - dw_ref.double()).abs().max() / dw_ref.double().abs().max()).item()
                            ok, err = ok1 and e2 < 1e-4 + 2 * torch.finfo(dw_ref.dtype).eps, max(e1, e2)
                        ok = ok and flag_cases(kind, cfg, dtype, dev, launch, smoke)
                        if dev == "cuda":
                            torch.cuda.synchronize()
                    except Exception as exc:  # a candidate that does not compile or run is recorded and dropped
                        log(type="check", unit=unit, label=label, ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
                        continue
                    log(type="check", unit=unit, label=label, ok=bool(ok), err=err, config=repr(cfg),
                        entry=table_entry(label, cfg))
                    if ok:
                        fns[label] = fn
                for name, build in refs.items():
                    try:
                        fns[name] = build(kind, x, w, dy)
                    except Exception as exc:
                        log(type="ref_error", unit=unit, ref=name, error=f"{type(exc).__name__}: {exc}"[:200])
                if kind == "fwd" and dname == "bf16" and time.time() < deadline - 60 and not smoke:
                    try:
                        fns["torch.compile"] = compiled(kind, x, w, dy)
                    except Exception as exc:
                        log(type="ref_error", unit=unit, ref="torch.compile", error=str(exc)[:200])
                log(type="begin", unit=unit, label="(timing)")
                t = measure_group(fns, dev, samples=3 if smoke else 8, min_samples=3, budget_s=0.04)
                moved = (2 if kind == "fwd" else 3) * x.numel() * x.element_size()
                copy_bw = 2 * x.numel() * x.element_size() / t["copy"].median_s
                for label, tm in t.items():
                    bw = (2 * x.numel() * x.element_size() if label == "copy" else moved) / tm.median_s
                    log(type="time", unit=unit, kind=kind, dtype=dname, n=n, m=m, label=label,
                        median_us=tm.median_s * 1e6, p10_us=tm.p10_s * 1e6, p90_us=tm.p90_s * 1e6,
                        tbps=bw / 1e12, pct_copy=100 * bw / copy_bw)
                log(type="unit_done", unit=unit)
                del fns, x, w, dy
                if dev == "cuda":
                    torch.cuda.empty_cache()
    return 0


def flag_cases(kind: str, cfg, dtype, dev: str, launch, smoke: bool) -> bool:
    """Team kernels only: partial p with eps outside, llama cast with offset, bias and residual (forward),
    dh and db (backward), at a small odd shape where teams have rows of their own and rows to spare."""
    import torch

    import rmsnorm
    from rmsnorm.functional import resolve

    if not getattr(cfg, "team", 0):
        return True
    n = max(cfg.block_n * cfg.team - 37, cfg.block_n * (cfg.team - 1) + 1)
    m = 5 if smoke else 301
    g = torch.Generator(device=dev).manual_seed(7)
    x = torch.randn(m, n, device=dev, dtype=dtype, generator=g) * 2
    w = torch.randn(n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, device=dev, dtype=dtype, generator=g)
    r = torch.randn(m, n, device=dev, dtype=dtype, generator=g)
    ok = True
    for kw in ({"p": 0.3, "eps_mode": "outside"}, {"cast": "llama", "offset": 1.0}):
        spec = resolve(x, w, b, r, None, EPS, kw.get("eps_mode", "inside"), kw.get("p", 1.0), "ceil",
                       kw.get("offset", 0.0), kw.get("cast", "fp32"), None)
        y_ref, h_ref = rmsnorm.rms_norm(x, w, b, residual=r, eps=EPS, backend="reference", **kw)
        y, h, rstd = launch.forward(x, w, b, r, spec, config=cfg if kind == "fwd" else None)
        tol = [t * (4 if smoke else 1) for t in TOL["bf16" if dtype.itemsize == 2 else "fp32"]]
        ok &= _close(y, y_ref, tol[0])[0] and _close(h, h_ref, 1.0 if dev == "cuda" else 2.0)[0]
        if kind == "bwd":
            dy = torch.randn(m, n, device=dev, dtype=dtype, generator=g)
            dh = torch.randn(m, n, device=dev, dtype=dtype, generator=g)
            leaves = [t.detach().requires_grad_(True) for t in (x, w, b)]
            yr, hr = rmsnorm.rms_norm(*leaves, residual=r, eps=EPS, backend="reference", **kw)
            gx, gw, gb = torch.autograd.grad((yr, hr), leaves, (dy, dh))
            dx, dw, db = launch.backward(dy, dh, h, w, rstd, spec, True, True, config=cfg)
            ok &= _close(dx, gx, tol[1])[0]
            rel = 1e-4 + 2 * torch.finfo(dtype).eps  # the reference rounds dW/db to the parameter dtype
            ok &= ((dw - gw.float()).abs().max() / gw.float().abs().max()).item() < rel
            ok &= ((db - gb.float()).abs().max() / gb.float().abs().max()).item() < rel
    return bool(ok)


def references(dev: str, smoke: bool) -> dict:
    """name -> build(kind, x, w, dy) -> callable timed as users call it (autograd for the backward)."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    def torch_ref(kind, x, w, dy):
        return _as_called(lambda a, b: F.rms_norm(a, (a.shape[-1],), b, EPS), kind, x, w, dy)

    out = {"torch.rms_norm": torch_ref}
    if dev == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        def liger(kind, x, w, dy):
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return _as_called(lambda a, b: LigerRMSNormFunction.apply(a, b, EPS), kind, x, w, dy)

        out["liger"] = liger
    del torch
    return out


def compiled(kind, x, w, dy):
    import torch
    import torch.nn.functional as F

    fn = torch.compile(lambda a, b: F.rms_norm(a, (a.shape[-1],), b, EPS), dynamic=False)
    return _as_called(fn, kind, x, w, dy)


def _as_called(fn, kind, x, w, dy):
    import torch

    if kind == "fwd":
        with torch.no_grad():
            fn(x, w)

        def run():
            with torch.no_grad():
                return fn(x, w)

        return run
    leaves = [x.detach().requires_grad_(True), w.detach().requires_grad_(True)]
    y = fn(*leaves)
    return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)


# ------------------------------------------------------------------------------------------ watchdog + table
def parent(args) -> int:
    log_path = args.out / "tune.jsonl"
    if not args.resume and log_path.exists():
        log_path.unlink()
    log_path.touch()
    cmd = [sys.executable, __file__, "--child", "--out", str(args.out), "--budget", str(args.budget),
           "--start", str(args.start)] + (["--smoke"] if args.smoke else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    for attempt in range(12):
        proc = subprocess.Popen(cmd, env=env)
        last_size, last_change = -1, time.time()
        while proc.poll() is None:
            time.sleep(1.0)
            size = log_path.stat().st_size
            if size != last_size:
                last_size, last_change = size, time.time()
            elif time.time() - last_change > args.stall:
                proc.kill()
                proc.wait()
                break
        if proc.returncode == 0:
            break
        rows = [json.loads(line) for line in log_path.read_text().splitlines()]
        begun = [r for r in rows if r.get("type") == "begin"]
        if not begun:
            print(f"tuning child failed before any candidate (exit {proc.returncode})", flush=True)
            break
        last = begun[-1]
        with log_path.open("a") as fh:
            fh.write(json.dumps({"type": "hung", "unit": last["unit"], "label": last["label"],
                                 "exit": proc.returncode, "t": round(time.time(), 2)}) + "\n")
        print(f"child stopped (exit {proc.returncode}) during {last['unit']} {last['label']}: skipping it, "
              f"restart {attempt + 1}", flush=True)
        if last["label"] == "(timing)":  # a unit whose timing itself fails: give it up
            with log_path.open("a") as fh:
                fh.write(json.dumps({"type": "unit_done", "unit": last["unit"], "timing_failed": True}) + "\n")
    write_outputs(args)
    return 0


def write_outputs(args) -> None:
    rows = [json.loads(line) for line in (args.out / "tune.jsonl").read_text().splitlines()]
    meta = next((r for r in rows if r.get("type") == "meta"), {})
    checks = {(r["unit"], r["label"]): r for r in rows if r.get("type") == "check"}
    times = [r for r in rows if r.get("type") == "time"]
    table: dict = {"meta": {"card": meta.get("card"), "date": meta.get("date"), "torch": meta.get("torch"),
                            "triton": meta.get("triton"),
                            "source": "benchmarks/gpu_tune.py: fastest candidate that passed its check"},
                   "fwd": {}, "bwd": {}}
    lines = ["| pass | dtype | N | best candidate | % of copy | default % | torch % | liger % | compile % |",
             "|---|---|---|---|---|---|---|---|---|"]
    units = sorted({r["unit"] for r in times}, key=lambda u: (u.split("/")[0], u.split("/")[1], int(u.split("/")[2])))
    for unit in units:
        kind, dname, n = unit.split("/")
        ut = {r["label"]: r for r in times if r["unit"] == unit}
        ours = {k: v for k, v in ut.items() if (unit, k) in checks and checks[(unit, k)]["ok"]}
        if not ours:
            continue
        best = min(ours, key=lambda k: ours[k]["median_us"])
        itemsize = {"bf16": 2, "fp32": 4}[dname]
        table[kind].setdefault(str(itemsize), []).append({"n": int(n), **checks[(unit, best)]["entry"],
                                                          "pct_copy": round(ours[best]["pct_copy"], 1)})

        def pct(label, ut=ut):
            return f"{ut[label]['pct_copy']:.0f}" if label in ut else "–"

        lines.append(f"| {kind} | {dname} | {n} | {best} | {ours[best]['pct_copy']:.0f} | {pct('default')} | "
                     f"{pct('torch.rms_norm')} | {pct('liger')} | {pct('torch.compile')} |")
    hung = [f"{r['unit']} {r['label']}" for r in rows if r.get("type") == "hung"]
    failed = [f"{k[0]} {k[1]}: {v.get('error', 'mismatch, err ' + str(v.get('err')))}" for k, v in checks.items()
              if not v["ok"]]
    text = (f"# Tuning run: {meta.get('card')}, {meta.get('date')}\n\n" + "\n".join(lines) +
            "\n\nHung (skipped): " + (", ".join(hung) or "none") + "\n\nFailed checks:\n" +
            ("\n".join(f"- {f}" for f in failed) or "none") + "\n")
    (args.out / "tune.md").write_text(text)
    (args.out / "tuned.json").write_text(json.dumps(table, indent=1) + "\n")
    if args.table:
        args.table.write_text(json.dumps(table, indent=1) + "\n")
    print(text, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds after which remaining units are skipped")
    ap.add_argument("--stall", type=float, default=90.0, help="seconds without progress before the child is killed")
    ap.add_argument("--table", type=Path, default=None,
                    help="also write the tuned table here (e.g. src/rmsnorm/backends/triton/tuned.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run in Triton's interpreter")
    ap.add_argument("--resume", action="store_true", help="keep the finished units of an earlier run in --out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.start = args.start or time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
