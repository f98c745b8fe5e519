"""Benchmark providers: implementations timed side by side by ``rmsnorm bench``.

A provider turns a :class:`Case` into a forward callable ``fwd(x, w) -> y``; the sweep derives the
backward and forward+backward timings from it through autograd, so every provider is measured the same
way. ``roofline`` is special: ``x.clone()``, an allocating read + write of the same tensor.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-6


@dataclass(frozen=True)
class Case:
    m: int
    n: int
    dtype: torch.dtype
    device: str
    mode: str  # "fwd", "bwd" or "fwd+bwd"

    def bytes_moved(self) -> int:
        """Bytes moved (docs/benchmarks/README.md): fwd reads x, writes y; bwd reads x and dy, writes dx."""
        per = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[self.mode]
        return per * self.m * self.n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Provider:
    name: str
    family: str  # "ours", "torch", "third-party", "roofline"
    build: Callable[[Case], Callable | None]  # case -> fwd(x, w) (weights created by the caller); None: roofline
    available: Callable[[str], str | None]  # device -> None, or why not
    uses_bias: bool = False  # LayerNorm's affine bias (timed with it, as nn.LayerNorm runs)


def _ours(backend: str | None, p: float = 1.0) -> Callable[[Case], Callable]:
    import rmsnorm

    def build(case: Case):
        return lambda x, w, b=None: rmsnorm.rms_norm(x, w, eps=EPS, p=p, backend=backend)

    return build


def _backend_available(name: str) -> Callable[[str], str | None]:
    def check(device: str) -> str | None:
        import rmsnorm

        info = next((b for b in rmsnorm.backends() if b.name == name), None)
        if info is None:
            return f"no backend {name}"
        if not info.available:
            return info.reason.splitlines()[0]
        if "*" not in info.devices and device not in info.devices:
            return f"{name} does not run on {device}"
        return None

    return check


def _layer_norm(case: Case):
    return lambda x, w, b: F.layer_norm(x, (case.n,), w, b, EPS)


def _rms_norm(case: Case):
    return lambda x, w, b=None: F.rms_norm(x, (case.n,), w, EPS)


def _compiled_rms_norm(case: Case):
    # The "bwd" mode re-runs one backward graph (retain_graph=True), which donated buffers forbid.
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    for knob in ("recompile_limit", "cache_size_limit"):  # one static-shape graph per benchmarked shape
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 256))

    def f(x, w, b=None):
        return F.rms_norm(x, (case.n,), w, EPS)

    return torch.compile(f, dynamic=False)


def _liger(case: Case):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return lambda x, w, b=None: LigerRMSNormFunction.apply(x, w, EPS)


def _always(device: str) -> str | None:
    return None


def _has(module: str, device_kind: str | None = None) -> Callable[[str], str | None]:
    def check(device: str) -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        if device_kind and device != device_kind:
            return f"runs on {device_kind} only"
        return None

    return check


def registry() -> dict[str, Provider]:
    """All providers, by name. Availability is checked per device by the sweep."""
    provs = [
        Provider("rmsnorm", "ours", _ours(None), _always),  # the automatic choice (cpu or triton)
        Provider("rmsnorm p=0.0625", "ours", _ours(None, 0.0625), _always),
        Provider("rmsnorm:reference", "ours", _ours("reference"), _backend_available("reference")),
        Provider("torch.layer_norm", "torch", _layer_norm, _always, uses_bias=True),
        Provider("torch.rms_norm", "torch", _rms_norm, _always),
        Provider("torch.compile(rms_norm)", "torch", _compiled_rms_norm, _has("torch._inductor")),
        Provider("liger.rms_norm", "third-party", _liger, _has("liger_kernel", "cuda")),
        Provider("roofline", "roofline", lambda case: None, _always),
    ]
    return {p.name: p for p in provs}


DEFAULT_PROVIDERS = ["rmsnorm", "rmsnorm p=0.0625", "torch.layer_norm", "torch.rms_norm", "torch.compile(rms_norm)",
                     "liger.rms_norm", "roofline"]
