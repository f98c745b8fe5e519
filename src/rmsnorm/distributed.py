"""DTensor sharding rules for the rmsnorm custom ops (tensor and sequence parallelism).

With rules registered, a DTensor input runs the fused kernel on each rank's local shard:

- forward: x (and residual) sharded on any dimension that is not normalized, or replicated; weight and
  bias replicated. y, h and rstd keep x's placement.
- backward: dx keeps the placement; dW and db are Partial (each rank's sum over its rows), which DTensor
  reduces when the gradient is used, so the weight gradient equals the single-device one.

FSDP2 needs nothing: it all-gathers parameters into plain tensors before the forward. DDP likewise.
"""

from __future__ import annotations

import threading

import torch

from .spec import decode

_done = threading.Event()
_lock = threading.Lock()


def _opt(t, placement):
    """The placement of an optional tensor argument: None where the argument is None."""
    return None if t is None else placement


def register_dtensor_rules() -> bool:
    """Register the sharding rules once; False where torch.distributed.tensor is unavailable."""
    if _done.is_set():
        return True
    with _lock:
        if _done.is_set():
            return True
        if not torch.distributed.is_available():
            return False
        try:
            from torch.distributed.tensor import Partial, Replicate, Shard
            from torch.distributed.tensor.experimental import register_sharding
        except ImportError:
            return False
        from . import ops  # noqa: F401  (defines the ops)

        fwd, bwd = torch.ops.rmsnorm.forward.default, torch.ops.rmsnorm.backward.default

        # placements of the tensor arguments, then None for each non-tensor argument (spec, ..., backend)
        @register_sharding(fwd)
        def _forward_rule(x, weight, bias, residual, spec, backend):
            nd = decode(spec).normalized_ndim
            r = Replicate()
            strategies = [([r, r, r], [r, _opt(weight, r), _opt(bias, r), _opt(residual, r), None, None])]
            for d in range(x.ndim - nd):
                s = Shard(d)
                strategies.append(([s, s if residual is not None else r, s],
                                   [s, _opt(weight, r), _opt(bias, r), _opt(residual, s), None, None]))
            return strategies

        @register_sharding(bwd)
        def _backward_rule(dy, dh, h, weight, bias, rstd, spec, need_dw, need_db, backend):
            nd = decode(spec).normalized_ndim
            r = Replicate()
            tail = [None] * 4
            strategies = [([r, r, r], [r, _opt(dh, r), r, _opt(weight, r), _opt(bias, r), r, *tail])]
            for d in range(h.ndim - nd):
                s = Shard(d)
                strategies.append(([s, Partial() if need_dw else r, Partial() if need_db else r],
                                   [s, _opt(dh, s), s, _opt(weight, r), _opt(bias, r), s, *tail]))
            return strategies

        _done.set()
        return True
