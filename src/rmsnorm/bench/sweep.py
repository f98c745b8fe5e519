"""The benchmark sweep: every (shape, dtype, mode, provider), rows appended to JSONL as they finish."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..host import allocator, cpu_model
from .providers import Case, Provider, registry
from .timing import measure_group

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LATENCY_SHAPES = [(64, 512), (1, 4096)]
TARGET_SHAPES = [(4096, 1024), (8192, 4096), (2048, 8192), (16384, 128), (512, 32768)]


@dataclass
class SweepConfig:
    shapes: list[tuple[int, int]]
    dtypes: list[str]
    modes: list[str]
    providers: list[str]
    device: str = "cpu"
    samples: int = 10
    budget_s: float = 0.5


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metadata(cfg: SweepConfig, command: str) -> dict:
    meta = {
        "type": "meta",
        "command": command,
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": cfg.device,
        "machine": cpu_model() if cfg.device == "cpu" else torch.cuda.get_device_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "allocator": allocator(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": _git_sha(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    return meta


def _inputs(m: int, n: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(m * 7919 + n)
    kw: dict[str, Any] = {"generator": g, "device": device, "dtype": dtype}
    x = torch.randn(m, n, **kw)
    w = 1 + 0.1 * torch.randn(n, **kw)
    b = 0.1 * torch.randn(n, **kw)
    dy = torch.randn(m, n, **kw)
    return x, w, b, dy


def _callable(prov: Provider, case: Case, x, w, b, dy):
    """(callable to time, seconds of the first call) for one provider and mode."""
    if prov.family == "roofline":
        return (lambda: x.clone()), None
    fwd = prov.build(case)
    assert fwd is not None  # only the roofline builds nothing
    args = (x, w, b) if prov.uses_bias else (x, w)
    t0 = time.perf_counter()
    if case.mode == "fwd":
        with torch.no_grad():
            fwd(*args)

        def run():
            with torch.no_grad():
                return fwd(*args)
    else:
        leaves = [t.detach().requires_grad_(True) for t in args]
        y = fwd(*leaves)
        torch.autograd.grad(y, leaves, dy, retain_graph=case.mode == "bwd")
        if case.mode == "bwd":
            def run():
                return torch.autograd.grad(y, leaves, dy, retain_graph=True)
        else:
            def run():
                return torch.autograd.grad(fwd(*leaves), leaves, dy)
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
    return run, time.perf_counter() - t0


def run_sweep(cfg: SweepConfig, out_jsonl: Path, command: str, progress: bool = True) -> list[dict]:
    """Each (shape, dtype, mode) group times its providers and the copy roofline round-robin."""
    provs = registry()
    unknown = [p for p in cfg.providers if p not in provs]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; known: {sorted(provs)}")
    chosen = []
    for name in dict.fromkeys([*cfg.providers, "roofline"]):
        why = provs[name].available(cfg.device)
        if why is None:
            chosen.append(provs[name])
        elif progress:
            print(f"  skipping {name}: {why}", flush=True)
    meta = metadata(cfg, command)
    rows: list[dict] = []
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    with out_jsonl.open("w") as fh:
        fh.write(json.dumps(meta) + "\n")
        for m, n in cfg.shapes:
            for dname in cfg.dtypes:
                x, w, b, dy = _inputs(m, n, DTYPES[dname], cfg.device)
                for mode in cfg.modes:
                    case = Case(m, n, DTYPES[dname], cfg.device, mode)
                    fns, first, ran = {}, {}, []
                    for prov in chosen:
                        try:
                            fns[prov.name], first[prov.name] = _callable(prov, case, x, w, b, dy)
                            ran.append(prov)
                        except Exception as exc:  # a provider that cannot run this shape (Liger above 64K)
                            if progress:
                                print(f"  {prov.name} failed on {m}x{n} {dname} {mode}: {str(exc)[:120]}")
                    timings = measure_group(fns, cfg.device, samples=cfg.samples, budget_s=cfg.budget_s)
                    roof = timings["roofline"]
                    roof_gbps = 2 * x.numel() * x.element_size() / roof.median_s / 1e9
                    for prov in ran:
                        row = _row(prov, case, timings[prov.name], first[prov.name], roof_gbps, x)
                        rows.append(row)
                        fh.write(json.dumps(row) + "\n")
                        fh.flush()
                        if progress:
                            print(f"  {m:>6}x{n:<6} {dname:<4} {mode:<7} {prov.name:<24} "
                                  f"{row['median_us']:>10.1f} us {row['gbps']:>7.1f} GB/s "
                                  f"{row['pct_roofline']:>5.0f}%", flush=True)
                    del fns
                del x, w, b, dy
    return [meta, *rows]


def _row(prov: Provider, case: Case, t, first_s: float | None, roof_gbps: float, x) -> dict:
    moved = 2 * x.numel() * x.element_size() if prov.family == "roofline" else case.bytes_moved()
    gbps = moved / t.median_s / 1e9
    return {
        "type": "result", "provider": prov.name, "family": prov.family, "m": case.m, "n": case.n,
        "dtype": str(case.dtype).removeprefix("torch."), "mode": case.mode,
        "median_us": t.median_s * 1e6, "p10_us": t.p10_s * 1e6, "p90_us": t.p90_s * 1e6, "samples": t.samples,
        "calls_per_sample": t.calls_per_sample, "gbps": gbps, "roofline_gbps": roof_gbps,
        "pct_roofline": 100 * gbps / roof_gbps, "first_call_s": first_s,
    }


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        m, _, n = item.strip().lower().partition("x")
        if not (m.isdigit() and n.isdigit()) or int(m) < 1 or int(n) < 1:
            raise ValueError(f"shapes must look like 4096x1024,64x512 with sizes >= 1; got {item!r}")
        out.append((int(m), int(n)))
    return out
