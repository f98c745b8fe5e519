"""Norm-level timing: LayerNorm, RMSNorm and pRMSNorm alone, forward + backward, at the tasks' shapes.

Two implementation settings, so that the time claim is tested where the paper made it and where users are:

- ``unfused``: each norm written as framework ops, as the paper's TensorFlow / Theano / PyTorch code did in
  2019 (mean, subtract, square, mean, rsqrt, multiply, add: one pass over memory per op);
- ``fused``: one kernel per direction: ``F.layer_norm`` for LayerNorm, this library's kernels for RMSNorm and
  pRMSNorm.

Every (shape, setting, norm) is one "implementation"; a round times each implementation once (a sample of
``reps`` forward + backward calls, about ``sample_s`` seconds), in an order rotated per round. Rounds continue
until every paired ratio's 95% CI is within ±1% (so that differences of 2% are resolved) or the time budget
is spent. Gains and biases of N elements are included and get gradients, as in a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import rmsnorm
from rmsnorm.args import partial_size

from .norms import EPS, PARTIAL_P, ops_norm
from .stats import time_ratio, within

NORMS = ("layernorm", "rmsnorm", "prmsnorm")
SETTINGS = ("unfused", "fused")


def _unfused(norm: str, n: int) -> Callable:
    k = partial_size(n, PARTIAL_P)
    return lambda x, w, b: ops_norm(norm + "-ops", x, w, b, k)


def _fused(norm: str, n: int, backend: str | None) -> Callable:
    if norm == "layernorm":
        return lambda x, w, b: F.layer_norm(x, (n,), w, b, EPS)
    p = PARTIAL_P if norm == "prmsnorm" else 1.0
    return lambda x, w, b: rmsnorm.rms_norm(x, w, b, eps=EPS, p=p, backend=backend)


def implementation(setting: str, norm: str, n: int, backend: str | None = None) -> Callable:
    """y = norm(x) * w + b for x of shape (rows, n), in the given setting."""
    return _unfused(norm, n) if setting == "unfused" else _fused(norm, n, backend)


def time_norms(shapes: dict[str, tuple[int, int]], budget_s: float, device: str = "cpu", backend: str | None = None,
               min_rounds: int = 8, sample_s: float = 0.01, target: float = 0.01,
               dtype: torch.dtype = torch.float32) -> dict:
    """Seconds per forward + backward call of every (shape, setting, norm), round by round; see the module
    docstring. ``shapes``: label -> (rows, N); every tensor in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    cases: dict[tuple[str, str, str], Callable[[], None]] = {}
    for label, (m, n) in shapes.items():
        x = torch.randn(m, n, generator=g).to(device, dtype).requires_grad_(True)
        w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype).requires_grad_(True)
        b = (0.1 * torch.randn(n, generator=g)).to(device, dtype).requires_grad_(True)
        dy = torch.randn(m, n, generator=g).to(device, dtype)
        for setting in SETTINGS:
            for norm in NORMS:
                f = implementation(setting, norm, n, backend)

                def step(f=f, x=x, w=w, b=b, dy=dy) -> None:
                    x.grad = w.grad = b.grad = None
                    f(x, w, b).backward(dy)

                cases[(label, setting, norm)] = step
    sync: Callable[[], None] = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    reps: dict[tuple, int] = {}
    for key, call in cases.items():  # warm-up and calibration: ~sample_s per sample
        call()
        sync()
        t0, r = time.perf_counter(), 0
        while time.perf_counter() - t0 < sample_s / 4:
            call()
            r += 1
        sync()
        per = (time.perf_counter() - t0) / r
        reps[key] = max(1, round(sample_s / per))
    keys = list(cases)
    samples: dict[tuple, list[float]] = {k: [] for k in keys}
    start, rounds = time.perf_counter(), 0
    while True:
        shift = rounds % len(keys)
        for key in keys[shift:] + keys[:shift]:
            call, n_rep = cases[key], reps[key]
            sync()
            t0 = time.perf_counter()
            for _ in range(n_rep):
                call()
            sync()
            samples[key].append((time.perf_counter() - t0) / n_rep)
        rounds += 1
        if rounds >= min_rounds and (_resolved(samples, shapes, target) or time.perf_counter() - start > budget_s):
            break
    return {"shapes": {k: list(v) for k, v in shapes.items()}, "rounds": rounds, "reps": {_name(k): v for k, v in
            reps.items()}, "seconds": {_name(k): v for k, v in samples.items()}, "device": device,
            "threads": torch.get_num_threads(), "backend": backend, "target_halfwidth": target,
            "dtype": str(dtype).removeprefix("torch.")}


def _name(key: tuple) -> str:
    return "/".join(key)


def comparisons(shape: str) -> list[tuple[str, str, str]]:
    """(setting, ours, reference) pairs compared at one shape."""
    return [(s, a, b) for s in SETTINGS for a, b in (("rmsnorm", "layernorm"), ("prmsnorm", "rmsnorm"))]


def _resolved(samples: dict, shapes: dict, target: float) -> bool:
    for shape in shapes:
        for setting, a, b in comparisons(shape):
            if not within(time_ratio(samples[(shape, setting, a)], samples[(shape, setting, b)]), target):
                return False
    return True
