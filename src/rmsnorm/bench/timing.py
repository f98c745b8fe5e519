"""Timing: warm-up, then repeated samples; each sample times a batch of calls long enough to measure.

``measure_group`` interleaves several callables round-robin (providers and the copy roofline of one
shape), so that the slow swings in speed of a shared machine hit them alike and ratios stay stable.

CPU samples use time.perf_counter; CUDA samples use CUDA events around the batch. Statistics are the
median and the 10th/90th percentiles of the per-call times of the samples.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    samples: int
    calls_per_sample: int


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device: str = "cpu", *, samples: int = 15, min_samples: int = 5,
            budget_s: float = 1.0, min_sample_s: float = 1e-2, warmup_s: float = 0.05) -> Timing:
    """Per-call time of ``fn``: warm-up, then up to ``samples`` samples within about ``budget_s``."""
    return measure_group({"fn": fn}, device, samples=samples, min_samples=min_samples, budget_s=budget_s,
                         min_sample_s=min_sample_s, warmup_s=warmup_s)["fn"]


def measure_group(fns: dict[str, Callable[[], object]], device: str = "cpu", *, samples: int = 10,
                  min_samples: int = 5, budget_s: float = 0.5, min_sample_s: float = 1e-2,
                  warmup_s: float = 0.05) -> dict[str, Timing]:
    """Time several callables round-robin (one sample of each per round), so slow drifts of the machine's
    speed affect all of them alike; ``budget_s`` is per callable."""
    batches = {}
    for name, fn in fns.items():
        _sync(device)
        t0 = time.perf_counter()
        calls = 0
        while calls < 2 or time.perf_counter() - t0 < warmup_s:
            fn()
            _sync(device)
            calls += 1
        # the batch size comes from calls after the warm-up: a first call may carry one-time costs (loading
        # a library, filling caches) that would shrink the batches to one call each
        t1 = time.perf_counter()
        for _ in range(3):
            fn()
        _sync(device)
        batches[name] = max(1, int(min_sample_s / max((time.perf_counter() - t1) / 3, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < samples and (rounds < min_samples or time.perf_counter() - start < budget_s * len(fns)):
        for name, fn in fns.items():
            times[name].append(_sample(fn, batches[name], device))
        rounds += 1
    out = {}
    for name, ts in times.items():
        ts.sort()
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
        out[name] = Timing(statistics.median(ts), q[0], q[-1], len(ts), batches[name])
    return out


def _sample(fn: Callable[[], object], batch: int, device: str) -> float:
    if device.startswith("cuda"):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / batch
    s = time.perf_counter()
    for _ in range(batch):
        fn()
    return (time.perf_counter() - s) / batch
