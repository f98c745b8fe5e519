"""Training runs with checkpoints and resume, optional DDP, and the interleaved timing phase.

Layout under the output directory (identical with and without torchrun; only rank 0 writes):

    runs/<task>/<variant>/lr<lr>/seed<k>/checkpoint.pt   while training (atomic replace every ckpt_every steps)
    runs/<task>/<variant>/lr<lr>/seed<k>/result.json     when finished: such a run is never trained again
    timing/<task>.json                  seconds per step of every variant, timed round-robin
    timing/norms.json                   the norm-level timing (rmsnorm.reproduce.normtime)
    timing/<task>-share.json            the share of a LayerNorm model's step spent in its norms (profiler)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..host import silenced_output
from .atomic import atomic_json, atomic_save
from .presets import Schedule
from .stats import time_ratio, within


def run_dir(out: Path, task: str, variant: str, seed: int, lr: float) -> Path:
    """Where one training run keeps its checkpoint and its result (see the layout above)."""
    return out / "runs" / task / variant / f"lr{lr:g}" / f"seed{seed}"


def finished(out: Path, task: str, variant: str, seed: int, lr: float) -> bool:
    return (run_dir(out, task, variant, seed, lr) / "result.json").exists()


class Dist:
    """torch.distributed state when launched by torchrun (gloo on CPU, nccl on CUDA), else one process."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            if device.startswith("cuda"):
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.main = self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world


def lr_at(size: Schedule, lr: float, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at the last step (``decay``: a converged
    end point), inverse square root (Transformer without ``decay``) or constant."""
    s = step + 1
    if size.warmup > 0 and s <= size.warmup:
        return lr * s / size.warmup
    if size.decay:
        return lr * (1 - (step - size.warmup) / (size.steps - size.warmup))
    if size.warmup > 0:
        return lr * math.sqrt(size.warmup / s)
    return lr


def autocast(device: str, dtype: str | None):
    """torch.autocast on CUDA with ``dtype`` ("bfloat16"), else a no-op context."""
    if dtype is None or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, dtype))


def _to(batch, device: str):
    return tuple(t.to(device, non_blocking=True) for t in batch)


def train_run(task, variant: str, seed: int, lr: float, run_dir: Path, device: str, backend: str | None, dd: Dist,
              on_step: Callable[[int, float], object] | None = None, dev_split: bool = False,
              amp: str | None = None) -> dict:
    """Train one (task, variant, seed) at ``lr`` to task.size.steps, resuming from its checkpoint; return its
    result (test metrics, and with ``dev_split`` the dev split's under "dev")."""
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    size: Schedule = task.size
    torch.manual_seed(seed)
    model = task.build(variant, backend).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ckpt_path = run_dir / "checkpoint.pt"
    step, train_s, curve, dev_curve, window = 0, 0.0, [], [], []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, train_s, curve, dev_curve = ck["step"], ck["train_s"], ck["curve"], ck.get("dev_curve", [])
        torch.set_rng_state(ck["rng"])
    dev_every = max(1, size.steps // max(size.dev_points, 1))
    wrapped = dd.wrap(model)

    def checkpoint() -> None:
        if dd.main:
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "train_s": train_s,
                         "curve": curve, "dev_curve": dev_curve, "rng": torch.get_rng_state()}, ckpt_path)

    try:
        while step < size.steps:
            batch = _to(task.batch(seed, step, dd.rank, dd.world), device)
            for g in opt.param_groups:
                g["lr"] = lr_at(size, lr, step)
            t0 = time.perf_counter()
            with autocast(device, amp):
                loss = task.loss(wrapped, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            train_s += time.perf_counter() - t0
            step += 1
            window.append(loss.item())
            if step % size.log_every == 0 or step == size.steps:
                curve.append([step, round(train_s, 4), dd.mean(sum(window) / len(window))])
                window = []
            if dd.main and (step % dev_every == 0 or step == size.steps):
                rng = torch.get_rng_state()  # the held-out loss leaves the training's random stream as it was
                dev_curve.append([step, round(task.dev_loss(model), 5)])
                torch.set_rng_state(rng)
            if step % size.ckpt_every == 0 and step < size.steps:
                checkpoint()
            if on_step:
                on_step(step, window[-1] if window else curve[-1][2])
    except KeyboardInterrupt:
        checkpoint()  # keep every finished step
        raise
    metrics = task.evaluate(model, "test") if dd.main else {}
    if dd.main and dev_split:
        metrics["dev"] = task.evaluate(model, "dev")
    result = {"task": task.name, "variant": variant, "seed": seed, "lr": lr, "steps": step, "train_seconds": train_s,
              "seconds_per_1k_steps": 1000 * train_s / max(step, 1), "params": params, "curve": curve,
              "dev_curve": dev_curve,
              "size": asdict(size), "world_size": dd.world, "backend": backend, **metrics}
    if dd.main:
        atomic_json(result_path, result)
        ckpt_path.unlink(missing_ok=True)
    dd.barrier()
    return result


def time_variants(task, variants: list[str], device: str, backend: str | None, rounds: int, steps: int,
                  path: Path, budget_s: float = 0.0, pairs: tuple[tuple[str, str], ...] = (),
                  amp: str | None = None) -> dict:
    """Seconds per training step of every variant, timed round-robin: each round runs ``steps`` steps of
    each variant (order rotated), so slow drifts of the machine hit all variants alike. Evaluation and
    data loading are excluded (batches are prepared before timing). After ``rounds`` rounds, more rounds
    run while the time spent is under ``budget_s`` and any ``pairs`` ratio's 95% CI is wider than ±1%."""
    if path.exists():
        return json.loads(path.read_text())
    torch.manual_seed(0)
    models = {v: task.build(v, backend).to(device) for v in variants}
    opts = {v: torch.optim.Adam(m.parameters(), lr=task.size.lr) for v, m in models.items()}
    batches = [_to(task.batch(0, i), device) for i in range(steps)]

    def run(v: str) -> float:
        t0 = time.perf_counter()
        for b in batches:
            with autocast(device, amp):
                loss = task.loss(models[v], b)
            opts[v].zero_grad(set_to_none=True)
            loss.backward()
            opts[v].step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / len(batches)

    def resolved() -> bool:
        return all(within(time_ratio(samples[a], samples[b]), 0.01) for a, b in pairs)

    for v in variants:  # warm-up (allocator, JIT builds, caches)
        run(v)
    samples: dict[str, list[float]] = {v: [] for v in variants}
    start, r = time.perf_counter(), 0
    while r < rounds or (time.perf_counter() - start < budget_s and not resolved()):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            samples[v].append(run(v))
        r += 1
    out = {"task": task.name, "rounds": r, "steps_per_round": steps, "threads": torch.get_num_threads(),
           "device": device, "backend": backend, "seconds_per_step": samples}
    atomic_json(path, out)
    return out


def norm_share(task, device: str, backend: str | None, path: Path, steps: int = 6) -> dict:
    """The share of a LayerNorm model's training step (forward, backward, optimizer) spent in LayerNorm
    forward and backward, from torch.profiler's self CPU times: what any change of the norm can save at
    most (Amdahl)."""
    if path.exists():
        return json.loads(path.read_text())
    torch.manual_seed(0)
    model = task.build("layernorm", backend).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=task.size.lr)
    batches = [_to(task.batch(0, i), device) for i in range(steps)]

    def step(b) -> None:
        loss = task.loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for b in batches[:2]:
        step(b)
    # (the profiler's C++ side logs its start and stop to stderr: kept off the terminal)
    with silenced_output(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for b in batches:
            step(b)
    total = norm = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        if "layer_norm" in e.key or "LayerNormBackward" in e.key:
            norm += e.self_cpu_time_total
    out = {"task": task.name, "steps": steps, "norm_share": norm / total if total else 0.0,
           "norm_us_per_step": norm / steps, "total_us_per_step": total / steps}
    atomic_json(path, out)
    return out
