"""One GPU session: correctness of the Triton backend, then timings against torch, Liger and the copy roofline.

    PYTHONPATH=src python benchmarks/gpu_check.py --out DIR [--budget 330]

Run it after benchmarks/gpu_tune.py has written the tuned table, so it measures the configurations users get.

1. Correctness: the triton backend against the reference backend on the GPU (forward and backward, bf16
   and fp32, every path the heuristics pick from 1K to 262K, flags), outputs and gradients.
2. Timings as users call it (rmsnorm bench's providers and round-robin timing, CUDA events): bf16 and
   fp32, M*N = 2^27, N from 1K to 262K, fwd / bwd / fwd+bwd, for rmsnorm, torch F.rms_norm, F.layer_norm,
   Liger (when importable) and the device-to-device copy roofline.
3. The kernels alone (launch.forward / launch.backward, no autograd) against the copy.
4. torch.compile of a Llama-style decoder block with rmsnorm.RMSNorm vs torch.nn.RMSNorm, forward+backward,
   default mode and mode="reduce-overhead" (block.md).
5. torch.compile(F.rms_norm) as a provider (bf16), while time remains.
Writes results.jsonl, all.jsonl, report.md, kernels.md, block.md, correctness.txt under --out; prints the
tables last. ``--smoke`` runs tiny shapes on CPU tensors in Triton's interpreter (tests the script).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

START = time.time()
DEV = "cuda"
TOTAL = 1 << 27  # M*N of every timed shape
NS = [1024, 4096, 8192, 16384, 32768, 65536, 131072, 262144]


def elapsed() -> float:
    return time.time() - START


def check_against_reference(x, w, b, r, what: str, backend: str, low_atol_ulps: float = 0.0, **kw) -> None:
    """Outputs and gradients of ``backend`` against the reference backend on the same device (fp32 math):
    within a few units of the output dtype's epsilon x max(|ref|, 1); dW/db relative to their scale."""
    from gpu_tune import TOL, _close

    import rmsnorm

    tol = TOL["fp32" if x.dtype == torch.float32 else "bf16"]
    slack = 1.0 + low_atol_ulps

    def run(be):
        leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, b, r)]
        out = rmsnorm.rms_norm(leaves[0], leaves[1], leaves[2], residual=leaves[3], backend=be, **kw)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator(device=x.device).manual_seed(5)
        cot = [torch.randn(o.shape, device=o.device, dtype=o.dtype, generator=g) for o in outs]
        torch.autograd.backward(outs, cot)
        return outs, [None if t is None else t.grad for t in leaves]

    (outs, grads), (refs, rgrads) = run(backend), run("reference")
    for i, (a, e) in enumerate(zip(outs, refs)):
        ok, err = _close(a, e, tol[0] * slack)
        assert ok, f"{what}: output {i} off by {err:.2f} eps"
    for name, a, e in zip(("dx", "dw", "db", "dres"), grads, rgrads):
        if e is None:
            assert a is None, f"{what}: {name} should be None"
            continue
        if name in ("dw", "db"):
            rel = ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30)).item()
            assert rel < 1e-4 + 2 * torch.finfo(e.dtype).eps, f"{what}: {name} relative error {rel:.2e}"
        else:
            ok, err = _close(a, e, tol[1] * slack)
            assert ok, f"{what}: {name} off by {err:.2f} eps"


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def correctness(out: Path) -> bool:
    lines, ok = [], True
    cases = []
    small = DEV == "cpu"
    for dtype in (torch.bfloat16, torch.float32):
        for n in (1000, 4096, 8192, 16384, 32768, 65537, 262144) if not small else (100, 300):
            m = 8 if n <= 32768 else 3
            cases.append((dtype, m, n, {}, n % 2 == 0))
        for kw in ({"p": 0.0625}, {"eps_mode": "outside", "cast": "llama"}, {"offset": 1.0}):
            for n in (4096, 16384, 65537) if not small else (64,):
                cases.append((dtype, 6, n, kw, n % 2 == 0))
        for kw in ({}, {"p": 0.0625, "offset": 1.0}):  # no residual: the eager entry's calls
            for n in (1000, 4096, 8192) if not small else (64,):
                cases.append((dtype, 5, n, kw, False))
    for dtype, m, n, kw, res_b in cases:
        x = rand(m, n, dtype=dtype, device=DEV, scale=2.0)
        w = rand(n, dtype=dtype, device=DEV)
        b = rand(n, dtype=dtype, device=DEV) if res_b else None
        r = rand(m, n, dtype=dtype, device=DEV) if res_b else None
        name = f"{str(dtype)[6:]} {m}x{n} {kw} bias/residual={res_b}"
        try:
            # the second and third calls launch pre-bound (rmsnorm.backends.triton.prebound), those without
            # a residual through the eager entry (rmsnorm.backends.triton.entry)
            for _ in range(3):
                # the interpreter truncates each bf16 cast instead of rounding it: up to one ulp for each of
                # the residual sum, the "llama" cast's rounding and the output store
                check_against_reference(x, w, b, r, what=name, backend="triton",
                                        low_atol_ulps=3.0 if DEV == "cpu" else 0.0, **kw)
            lines.append(f"PASS {name}")
        except Exception as exc:  # report every failure, keep going
            ok = False
            lines.append(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}")
    (out / "correctness.txt").write_text("\n".join(lines) + "\n")
    fails = [line for line in lines if line.startswith("FAIL")]
    from rmsnorm.backends.triton import prebound

    launches = "C++ (cuLaunchKernel)" if prebound._cxx_module() is not None else "Python (pre-bound CompiledKernel.run)"
    print(f"[{elapsed():.0f}s] correctness: {len(lines) - len(fails)}/{len(lines)} passed; the eager entry's "
          f"launches after the first: {launches}", flush=True)
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


def llama_block(out: Path, deadline: float, tokens: int = 8192, hidden: int = 4096) -> list[str]:
    """torch.compile of a Llama-style decoder block (pre-norm attention + SwiGLU MLP, bf16), forward+backward
    step, with rmsnorm.RMSNorm against torch.nn.RMSNorm (which Inductor fuses); default mode, then
    mode="reduce-overhead" (CUDA graphs) while time remains. Writes block.md; returns its lines."""
    import torch.nn.functional as F
    from torch import nn

    import rmsnorm
    from rmsnorm.bench.timing import measure_group

    heads, ffn, seq = hidden // 128, int(hidden * 8 / 3) // 256 * 256, min(2048, tokens)
    batch = tokens // seq

    class Block(nn.Module):
        def __init__(self, norm) -> None:
            super().__init__()
            self.n1, self.n2 = norm(hidden), norm(hidden)
            self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
            self.o = nn.Linear(hidden, hidden, bias=False)
            self.up = nn.Linear(hidden, 2 * ffn, bias=False)
            self.down = nn.Linear(ffn, hidden, bias=False)

        def forward(self, x):
            q, k, v = self.qkv(self.n1(x)).view(batch, seq, 3, heads, 128).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, hidden)
            h = x + self.o(a)
            gate, up = self.up(self.n2(h)).chunk(2, dim=-1)
            return h + self.down(F.silu(gate) * up)

    norms = {"rmsnorm.RMSNorm": lambda d: rmsnorm.RMSNorm(d, eps=1e-6),
             "torch.nn.RMSNorm": lambda d: nn.RMSNorm(d, eps=1e-6)}
    torch.manual_seed(0)
    x = torch.randn(batch, seq, hidden, device=DEV, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    lines = [f"Llama-style block, hidden {hidden}, {tokens} tokens (batch {batch} x {seq}), bf16, forward+backward",
             "", "| mode | norm | step ms (median) | p10 | p90 | compile s |", "|---|---|---|---|---|---|"]
    for mode in ("default", "reduce-overhead"):
        if time.time() > deadline:
            lines.append(f"| {mode} | (skipped: out of time) | | | | |")
            continue
        fns, compile_s = {}, {}
        for name, norm in norms.items():
            torch.manual_seed(1)
            block = Block(norm).to(DEV, torch.bfloat16)
            step = torch.compile(block, mode=None if mode == "default" else mode)
            xl = x.detach().requires_grad_(True)

            def run(step=step, block=block, xl=xl):
                y = step(xl)
                return torch.autograd.grad(y, [xl, *block.parameters()], dy)

            t0 = time.time()
            try:
                for _ in range(3):
                    run()
                torch.cuda.synchronize() if DEV == "cuda" else None
            except Exception as exc:
                lines.append(f"| {mode} | {name}: error {type(exc).__name__}: {str(exc)[:150]} | | | | |")
                continue
            compile_s[name] = time.time() - t0
            fns[name] = run
        if fns:
            t = measure_group(fns, DEV, samples=10, min_samples=3, budget_s=0.3)
            for name, tm in t.items():
                lines.append(f"| {mode} | {name} | {tm.median_s * 1e3:.3f} | {tm.p10_s * 1e3:.3f} | "
                             f"{tm.p90_s * 1e3:.3f} | {compile_s[name]:.0f} |")
        print(f"[{elapsed():.0f}s] block {mode} done", flush=True)
    (out / "block.md").write_text("\n".join(lines) + "\n")
    return lines


def kernel_level(out: Path) -> list[str]:
    """The kernels alone (launch.forward; launch.backward = dx + dW with its reduction), no autograd, round-robin
    with the copy: the GPU targets of docs/benchmarks/gpu.md are about these."""
    from rmsnorm.backends.triton import launch
    from rmsnorm.bench.timing import measure_group
    from rmsnorm.spec import Spec

    lines = ["| dtype | N | copy TB/s | forward TB/s | forward % of copy | backward TB/s | backward % of copy |",
             "|---|---|---|---|---|---|---|"]
    for dtype in (torch.bfloat16, torch.float32):
        for n in NS:
            m = TOTAL // n
            x = torch.randn(m, n, device=DEV, dtype=dtype)
            w = torch.randn(n, device=DEV, dtype=dtype)
            dy = torch.randn_like(x)
            spec = Spec(1, n, 1e-6, False, 0.0, None, dtype, False)
            _, _, rstd = launch.forward(x, w, None, None, spec)
            t = measure_group({"copy": lambda x=x: x.clone(),
                               "fwd": lambda x=x, w=w, spec=spec: launch.forward(x, w, None, None, spec),
                               "bwd": lambda x=x, w=w, dy=dy, rstd=rstd, spec=spec: launch.backward(
                                   dy, None, x, w, rstd, spec, True, False)}, DEV, samples=8, budget_s=0.05)
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


def gpu_targets(rows: list[dict]) -> list[str]:
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
    ap.add_argument("--no-block", action="store_true", help="skip the compiled Llama-style block")
    args = ap.parse_args()
    global DEV, TOTAL, NS
    if args.smoke:
        DEV, TOTAL, NS = "cpu", 1 << 12, [128, 512]
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = START + args.budget
    import triton

    import rmsnorm
    from rmsnorm.backends.triton.heuristics import tuned_table
    from rmsnorm.bench import report

    print(f"tuned table: {tuned_table().get('meta') or 'none (hand-set rules)'}", flush=True)
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
    block_lines: list[str] = []
    if not args.no_block:
        try:
            block_lines = llama_block(args.out, deadline - 30, *((8192, 4096) if DEV == "cuda" else (64, 256)))
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
        targets = gpu_targets(results)
        (args.out / "report.md").write_text(text + "\n### GPU targets (docs/benchmarks/gpu.md), bf16\n\n" + "\n".join(
            f"- {b}" for b in targets) + "\n")
        report.plot(results, args.out / "gbps.png", title=f"{card}, torch {torch.__version__}")
        print(summary(results), flush=True)
        print("\n".join(targets), flush=True)
    if kernel_lines:
        print("kernels alone (no autograd):\n" + "\n".join(kernel_lines), flush=True)
    if block_lines:
        print("\n".join(block_lines), flush=True)
    print(f"[{elapsed():.0f}s] done; correctness {'PASS' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
