"""Where does eager time go on the GPU? CPU time to enqueue a call vs GPU time per call.

    PYTHONPATH=src python benchmarks/gpu_overhead.py

For each callable: CPU µs per call (perf_counter over a loop of launches, no sync inside) and GPU µs
per call (CUDA events over the same loop). When CPU >= GPU the loop is launch-bound: the kernels idle.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timeit(fn, iters: int = 40) -> tuple[float, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    cpu = (time.perf_counter() - t0) / iters
    end.record()
    end.synchronize()
    return cpu * 1e6, start.elapsed_time(end) * 1e3 / iters


def main() -> None:
    import torch.nn.functional as F

    import rmsnorm
    from rmsnorm.backends.triton import launch
    from rmsnorm.spec import Spec

    n, m = 4096, (1 << 27) // 4096
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    spec = Spec(1, n, 1e-6, False, 0.0, None, x.dtype, False)
    _, _, rstd = launch.forward(x, w, None, None, spec)
    y = rmsnorm.rms_norm(xl, wl)
    yt = F.rms_norm(xl, (n,), wl, 1e-6)
    cases = {
        "launch.forward (raw)": lambda: launch.forward(x, w, None, None, spec),
        "launch.backward (raw)": lambda: launch.backward(dy, None, x, w, rstd, spec, True, False),
        "rms_norm fwd no_grad": lambda: rmsnorm.rms_norm(x, w),
        "rms_norm bwd (autograd.grad)": lambda: torch.autograd.grad(y, (xl, wl), dy, retain_graph=True),
        "rms_norm fwd+bwd": lambda: torch.autograd.grad(rmsnorm.rms_norm(xl, wl), (xl, wl), dy),
        "torch.rms_norm fwd+bwd": lambda: torch.autograd.grad(F.rms_norm(xl, (n,), wl, 1e-6), (xl, wl), dy),
        "torch.rms_norm bwd": lambda: torch.autograd.grad(yt, (xl, wl), dy, retain_graph=True),
        "x.clone()": lambda: x.clone(),
    }
    print(f"{torch.cuda.get_device_name()}  M={m} N={n} bf16")
    print("| callable | CPU µs/call | GPU µs/call | CPU µs, gc off | GPU µs, gc off |")
    print("|---|---|---|---|---|")
    for name, fn in cases.items():
        with torch.no_grad() if "no_grad" in name or "raw" in name or "clone" in name else torch.enable_grad():
            c1, g1 = timeit(fn)
            gc.disable()
            c2, g2 = timeit(fn)
            gc.enable()
        print(f"| {name} | {c1:.0f} | {g1:.0f} | {c2:.0f} | {g2:.0f} |")
    # the Python cost alone: tiny tensors
    xs, ws = torch.randn(8, 64, device="cuda"), torch.randn(64, device="cuda")
    c, g = timeit(lambda: launch.forward(xs, ws, None, None, Spec(1, 64, 1e-6, False, 0.0, None, xs.dtype, False)), 200)
    print(f"| launch.forward on 8x64 (launch overhead) | {c:.0f} | {g:.0f} | | |")


if __name__ == "__main__":
    main()
