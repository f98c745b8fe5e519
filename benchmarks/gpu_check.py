"""One GPU session: correctness of the Triton backend, then timings against torch, Liger and the copy roofline.

    PYTHONPATH=src python benchmarks/gpu_check.py --out DIR [--budget 330]

1. Correctness: the triton backend against the reference backend on the GPU (forward and backward, bf16
   and fp32, every path of the heuristics: row tiles, accumulators in registers or in partials, looped
   forward, tiled backward), with the test suite's tolerance rule.
2. Timings (rmsnorm bench's providers and round-robin timing, CUDA events): bf16 and fp32, M*N = 2^27,
   N from 1K to 262K, fwd / bwd / fwd+bwd, for rmsnorm, torch F.rms_norm, F.layer_norm, Liger (when
   importable), the device-to-device copy roofline; torch.compile(F.rms_norm) last, while time remains.
3. Exploration: a few alternative launch configurations for key N (bf16), timed against the copy, to
   check the heuristics' picks.
Writes results.jsonl, report.md, tuning.md, correctness.txt under --out; prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

START = time.time()
DEV = "cuda"
TOTAL = 1 << 27  # M*N of every timed shape
NS = [1024, 4096, 8192, 16384, 32768, 65536, 131072, 262144]


def elapsed() -> float:
    return time.time() - START


def correctness(out: Path) -> bool:
    from helpers import check_against_reference, rand

    lines, ok = [], True
    cases = []
    small = DEV == "cpu"
    for dtype in (torch.bfloat16, torch.float32):
        for n in (1000, 4096, 8192, 16384, 32768, 65537, 262144) if not small else (100, 300):
            m = 8 if n <= 32768 else 3
            cases.append((dtype, m, n, {}))
        for kw in ({"p": 0.0625}, {"eps_mode": "outside", "cast": "llama"}, {"offset": 1.0}):
            for n in (4096, 16384, 65537) if not small else (64,):
                cases.append((dtype, 6, n, kw))
    for dtype, m, n, kw in cases:
        res_b = n % 2 == 0
        x = rand(m, n, dtype=dtype, device=DEV, scale=2.0)
        w = rand(n, dtype=dtype, device=DEV)
        b = rand(n, dtype=dtype, device=DEV) if res_b else None
        r = rand(m, n, dtype=dtype, device=DEV) if res_b else None
        name = f"{str(dtype)[6:]} {m}x{n} {kw} bias/residual={res_b}"
        try:
            check_against_reference(x, w, b, r, what=name, backend="triton",
                                    low_atol_ulps=1.0 if DEV == "cpu" else 0.0, **kw)
            lines.append(f"PASS {name}")
        except Exception as exc:  # report every failure, keep going
            ok = False
            lines.append(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}")
    (out / "correctness.txt").write_text("\n".join(lines) + "\n")
    fails = [line for line in lines if line.startswith("FAIL")]
    print(f"[{elapsed():.0f}s] correctness: {len(lines) - len(fails)}/{len(lines)} passed", flush=True)
    for line in fails[:10]:
        print("  " + line, flush=True)
    return ok


def sweep(out: Path, providers: list[str], dtypes: list[str], name: str, samples: int, budget: float) -> list[dict]:
    from rmsnorm.bench.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(shapes=[(TOTAL // n, n) for n in NS], dtypes=dtypes, modes=["fwd", "bwd", "fwd+bwd"],
                      providers=providers, device=DEV, samples=samples, budget_s=budget)
    rows = run_sweep(cfg, out / f"{name}.jsonl", "benchmarks/gpu_check.py", progress=False)
    print(f"[{elapsed():.0f}s] sweep {name} done ({len(rows) - 1} rows)", flush=True)
    return rows


def explore(out: Path, deadline: float) -> None:
    """Time alternative launch configs (bf16) for key N against the copy; write tuning.md."""
    from rmsnorm.args import Params
    from rmsnorm.backends.triton import launch
    from rmsnorm.backends.triton.heuristics import BwdConfig, FwdConfig, bwd_config, fwd_config
    from rmsnorm.bench.timing import measure_group

    sms = launch.sm_count(torch.device(DEV))
    lines = ["| pass | N | config | µs | % of copy | heuristic pick |", "|---|---|---|---|---|---|"]
    fwd_cands = {
        65536: [FwdConfig(1, b, w, False) for b, w in ((4096, 8), (8192, 16), (16384, 16))],
        262144: [FwdConfig(1, b, w, False) for b, w in ((4096, 8), (8192, 16), (16384, 16))],
    }
    bwd_cands = {
        1024: [BwdConfig(bm, 1024, w, True, sms * k) for bm, w, k in
               ((4, 4, 2), (4, 4, 4), (4, 8, 2), (8, 8, 2), (2, 4, 4), (8, 4, 2))],
        4096: [BwdConfig(1, 4096, 8, True, sms * k) for k in (2, 3)] + [BwdConfig(2, 4096, 8, True, sms * 2)],
        16384: [BwdConfig(1, 4096, 8, False, g) for g in (66, 132, 264)],
    }
    if DEV == "cpu":  # smoke run: shrink every candidate to the tiny rows used there
        fwd_cands = {128: [FwdConfig(1, 128, 4, True), FwdConfig(1, 32, 4, False)]}
        bwd_cands = {128: [BwdConfig(1, 128, 4, True, 3), BwdConfig(1, 128, 4, True, 3, False),
                           BwdConfig(1, 32, 4, False, 2)]}
    for kind, cands in (("fwd", fwd_cands), ("bwd", bwd_cands)):
        for n, configs in cands.items():
            if time.time() > deadline:
                lines.append(f"| {kind} | {n} | (skipped: out of time) | | | |")
                continue
            m = TOTAL // n
            x = torch.randn(m, n, device=DEV, dtype=torch.bfloat16)
            w = torch.randn(n, device=DEV, dtype=torch.bfloat16)
            prm = Params(n, 1e-6, False, 0.0, False)
            fns = {"copy": lambda x=x: x.clone()}
            if kind == "fwd":
                pick = fwd_config(m, n)
                for c in configs:
                    fns[repr(c)] = lambda c=c, x=x, w=w, prm=prm: launch.forward(x, w, None, None, prm, x.dtype,
                                                                                  config=c)
                moved = 2 * x.numel() * 2
            else:
                pick = bwd_config(m, n, sms)
                _, _, rstd = launch.forward(x, w, None, None, prm, x.dtype)
                dy = torch.randn_like(x)
                for c in configs:
                    fns[repr(c)] = lambda c=c, x=x, w=w, dy=dy, rstd=rstd, prm=prm: launch.backward(
                        dy, None, x, w, rstd, prm, True, False, config=c)
                moved = 3 * x.numel() * 2
            try:
                t = measure_group(fns, DEV, samples=6, min_samples=3, budget_s=0.05)
            except Exception as exc:
                lines.append(f"| {kind} | {n} | error {type(exc).__name__}: {str(exc)[:120]} | | | |")
                continue
            copy_bw = 2 * x.numel() * 2 / t["copy"].median_s
            for c in configs:
                tt = t[repr(c)].median_s
                pct = 100 * moved / tt / copy_bw
                lines.append(f"| {kind} | {n} | {c} | {tt * 1e6:.0f} | {pct:.0f}% | {'yes' if c == pick else ''} |")
            fns.clear()
            if DEV == "cuda":
                torch.cuda.empty_cache()
    (out / "tuning.md").write_text("\n".join(lines) + "\n")
    print(f"[{elapsed():.0f}s] exploration done", flush=True)


def kernel_level(out: Path) -> list[str]:
    """The kernels alone (launch.forward; launch.backward = dx + dW with its reduction), no autograd, round-robin
    with the copy: the GPU issue's bars are about these."""
    from rmsnorm.args import Params
    from rmsnorm.backends.triton import launch
    from rmsnorm.bench.timing import measure_group

    lines = ["| dtype | N | copy TB/s | forward TB/s | forward % of copy | backward TB/s | backward % of copy |",
             "|---|---|---|---|---|---|---|"]
    for dtype in (torch.bfloat16, torch.float32):
        for n in NS:
            m = TOTAL // n
            x = torch.randn(m, n, device=DEV, dtype=dtype)
            w = torch.randn(n, device=DEV, dtype=dtype)
            dy = torch.randn_like(x)
            prm = Params(n, 1e-6, False, 0.0, False)
            _, _, rstd = launch.forward(x, w, None, None, prm, dtype)
            t = measure_group({"copy": lambda x=x: x.clone(),
                               "fwd": lambda x=x, w=w, prm=prm: launch.forward(x, w, None, None, prm, x.dtype),
                               "bwd": lambda x=x, w=w, dy=dy, rstd=rstd, prm=prm: launch.backward(
                                   dy, None, x, w, rstd, prm, True, False)}, DEV, samples=8, budget_s=0.05)
            size = x.numel() * x.element_size()
            copy = 2 * size / t["copy"].median_s
            f, b = 2 * size / t["fwd"].median_s, 3 * size / t["bwd"].median_s
            lines.append(f"| {str(dtype)[6:]} | {n} | {copy / 1e12:.2f} | {f / 1e12:.2f} | {100 * f / copy:.0f}% | "
                         f"{b / 1e12:.2f} | {100 * b / copy:.0f}% |")
    (out / "kernels.md").write_text("\n".join(lines) + "\n")
    print(f"[{elapsed():.0f}s] kernel-level table done", flush=True)
    return lines


def summary(rows: list[dict]) -> str:
    """Short table: TB/s and % of copy for rmsnorm / torch.rms_norm / liger per (dtype, N, mode)."""
    res = [r for r in rows if r.get("type") == "result"]
    idx = {(r["provider"], r["dtype"], r["n"], r["mode"]): r for r in res}
    provs = [p for p in ("rmsnorm", "torch.rms_norm", "liger.rms_norm", "torch.layer_norm",
                         "torch.compile(rms_norm)") if any(r["provider"] == p for r in res)]
    head = "| dtype | N | mode | copy TB/s | " + " | ".join(f"{p} TB/s (%copy)" for p in provs) + " |"
    lines = [head, "|" + "---|" * (4 + len(provs))]
    for dt in ("bfloat16", "float32"):
        for n in sorted({r["n"] for r in res}):
            for mode in ("fwd", "bwd", "fwd+bwd"):
                copy = idx.get(("roofline", dt, n, mode))
                if copy is None:
                    continue
                cells = []
                for p in provs:
                    r = idx.get((p, dt, n, mode))
                    cells.append("–" if r is None else f"{r['gbps'] / 1e3:.2f} ({r['pct_roofline']:.0f}%)")
                lines.append(f"| {dt} | {n} | {mode} | {copy['gbps'] / 1e3:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gpu_bars(rows: list[dict]) -> list[str]:
    res = [r for r in rows if r.get("type") == "result" and r["dtype"] == "bfloat16"]
    idx = {(r["provider"], r["n"], r["mode"]): r for r in res}
    out = []

    def pct(n, mode):
        r = idx.get(("rmsnorm", n, mode))
        return None if r is None else r["pct_roofline"]

    f1 = [(n, pct(n, "fwd")) for n in (1024, 4096, 8192, 16384, 32768, 65536) if pct(n, "fwd") is not None]
    f2 = [(n, pct(n, "fwd")) for n in (131072, 262144) if pct(n, "fwd") is not None]
    b1 = [(n, pct(n, "bwd")) for n in (1024, 4096, 8192, 16384, 32768) if pct(n, "bwd") is not None]
    for label, vals, lim in (("forward >= 90% of copy, N 1K-64K", f1, 90), ("forward >= 80% of copy, N 128K-262K",
                             f2, 80), ("backward >= 70% of copy, N 1K-32K", b1, 70)):
        if vals:
            worst = min(vals, key=lambda v: v[1])
            out.append(f"{label}: {'yes' if all(v >= lim for _, v in vals) else 'NO'} (lowest {worst[1]:.0f}% at "
                       f"N={worst[0]})")
    for other in ("torch.rms_norm", "liger.rms_norm"):
        worse = []
        for (p, n, mode), r in idx.items():
            if p == "rmsnorm" and mode in ("fwd", "bwd") and (other, n, mode) in idx:
                ratio = r["median_us"] / idx[(other, n, mode)]["median_us"]
                if ratio >= 1.0:
                    worse.append(f"N={n} {mode} {ratio:.2f}")
        if any((other, n, m) in idx for (_, n, m) in idx):
            verdict = "yes" if not worse else "NO: " + ", ".join(worse)
            out.append(f"faster than {other} on every N, fwd and bwd: {verdict}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=330.0, help="seconds before optional parts are skipped")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run in Triton's interpreter (tests the script)")
    ap.add_argument("--explore", action="store_true", help="also time alternative launch configurations")
    args = ap.parse_args()
    global DEV, TOTAL, NS
    if args.smoke:
        DEV, TOTAL, NS = "cpu", 1 << 12, [128, 512]
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = START + args.budget
    import triton

    import rmsnorm
    from rmsnorm.bench import report

    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        card, sms = props.name, props.multi_processor_count
    else:
        card, sms = "CPU (Triton interpreter smoke run)", 4
    print(f"{card}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"rmsnorm {rmsnorm.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    print([(b.name, b.available, b.reason[:60]) for b in rmsnorm.backends()], flush=True)
    ok = correctness(args.out)
    rows: list[dict] = []
    try:
        provs = ["rmsnorm", "torch.rms_norm", "torch.layer_norm", "liger.rms_norm", "roofline"]
        if DEV == "cpu":
            from rmsnorm.backends import registry

            registry.set_default("triton")  # the smoke run times the interpreted Triton kernels
        rows = sweep(args.out, provs, ["bf16", "fp32"], "results", samples=8, budget=0.04)
    except Exception:
        traceback.print_exc()
    kernel_lines: list[str] = []
    try:
        kernel_lines = kernel_level(args.out)
    except Exception:
        traceback.print_exc()
    if args.explore:
        try:
            explore(args.out, deadline - 60)
        except Exception:
            traceback.print_exc()
    if time.time() < deadline - 40 and DEV == "cuda":
        try:
            comp = sweep(args.out, ["torch.compile(rms_norm)", "roofline"], ["bf16"], "compiled", samples=6,
                         budget=0.04)
            rows += [r for r in comp[1:] if r.get("provider") != "roofline"]
        except Exception:
            traceback.print_exc()
    else:
        print(f"[{elapsed():.0f}s] skipping torch.compile sweep (out of time)", flush=True)
    if rows:
        meta = rows[0]
        results = [r for r in rows[1:] if r.get("type") == "result"]
        with (args.out / "all.jsonl").open("w") as fh:
            for r in [meta, *results]:
                fh.write(json.dumps(r) + "\n")
        text = report.markdown(meta, results)
        bars = gpu_bars(results)
        (args.out / "report.md").write_text(text + "\n### Bars (GPU issue, bf16)\n\n" + "\n".join(
            f"- {b}" for b in bars) + "\n")
        report.plot(results, args.out / "gbps.png", title=f"{card}, torch {torch.__version__}")
        print(summary(results), flush=True)
        print("\n".join(bars), flush=True)
    if kernel_lines:
        print("kernels alone (no autograd):\n" + "\n".join(kernel_lines), flush=True)
    print(f"[{elapsed():.0f}s] done; correctness {'PASS' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
