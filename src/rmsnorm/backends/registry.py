"""Backend registry: what each backend supports, whether it is available, and how one is chosen.

A backend is a :class:`Backend` record: a forward and a backward (the :class:`ForwardFn` and
:class:`BackwardFn` contracts below, on tensors of the caller's shape), optionally an eager forward that
records its own autograd node (:class:`AutogradFn`), the devices and dtypes it serves, and a check that
says whether it can run here (and why not). Backends register themselves when imported; importing one
imports no heavy dependency (Triton, the compiled CPU library) until it is first used.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..spec import Spec

ENV_VAR = "RMSNORM_BACKEND"


class ForwardFn(Protocol):
    """(y, h | None, rstd): y in ``spec.out_dtype`` and x's shape, h = x + residual in residual's dtype (only
    with a residual), rstd = 1 / r per row in the fp32 (fp64) compute dtype, of the batch shape."""

    def __call__(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
                 spec: Spec) -> tuple[Tensor, Tensor | None, Tensor]: ...


class BackwardFn(Protocol):
    """(dh, dw | None, db | None): dh in h's dtype and shape (dy's gradient plus ``dh``, the gradient of the
    h output); dw and db in the parameters' dtypes and shapes, when asked for."""

    def __call__(self, dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor | None, bias: Tensor | None,
                 rstd: Tensor, spec: Spec, need_dw: bool, need_db: bool
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]: ...


class AutogradFn(Protocol):
    """An eager forward that records its own autograd node: (y, h | None)."""

    def __call__(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
                 spec: Spec) -> tuple[Tensor, Tensor | None]: ...


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int  # higher wins when choosing automatically
    devices: frozenset[str]  # device types; "*" for any
    dtypes: frozenset[torch.dtype]  # dtypes of x, residual and the output (and of a spec's round_to)
    forward: ForwardFn
    backward: BackwardFn
    check_available: Callable[[], str | None]  # None when usable, else why not (may build on first call)
    description: str
    auto_devices: frozenset[str] | None = None  # devices where automatic choice may pick it (None: all)
    autograd: AutogradFn | None = None  # optional eager forward recorded for autograd natively

    def unavailable_reason(self) -> str | None:
        return _availability(self)

    def unsupported_reason(self, x: torch.Tensor, residual: torch.Tensor | None, spec: Spec) -> str | None:
        """None when this backend runs the call, else why not (the backend answers before it is called)."""
        if "*" not in self.devices and x.device.type not in self.devices:
            return f"device {x.device.type} is not supported (supports {sorted(self.devices)})"
        for what, dt in (("x", x.dtype), ("residual", None if residual is None else residual.dtype),
                         ("out_dtype", spec.out_dtype), ("cast rounding", spec.round_to)):
            if dt is not None and dt not in self.dtypes:
                return f"{what} dtype {dt} is not supported"
        return None


class BackendInfo(NamedTuple):
    name: str
    available: bool
    reason: str  # why not available ("" when available)
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    description: str


_REGISTRY: dict[str, Backend] = {}
# $RMSNORM_BACKEND is read once, when rmsnorm is imported (os.environ costs ~1 µs a call);
# set_default() changes it at run time.
_DEFAULT: list[str | None] = [os.environ.get(ENV_VAR) or None]
_AVAILABLE: dict[str, str | None] = {}
_LOCK = threading.Lock()
_SELECT_CACHE: dict[tuple, Backend] = {}
_WARNED: set[str] = set()
# Called whenever the choice can change (default, registrations, availability): eager entries that skip
# select() (the cpu backend's) keep their own copy of the answer and refresh it here.
_ON_CHANGE: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` now and whenever the backend choice may change."""
    _ON_CHANGE.append(listener)
    listener()


def _changed() -> None:
    _SELECT_CACHE.clear()
    for listener in _ON_CHANGE:
        listener()


def automatic_choice(device_type: str) -> str | None:
    """The backend a call on ``device_type`` gets when it names none (the default, else the highest-priority
    backend that serves the device automatically and is available), without a tensor; None if none."""
    if _DEFAULT[0] is not None:
        return _DEFAULT[0]
    for be in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        if be.auto_devices is not None and device_type not in be.auto_devices:
            continue
        if "*" not in be.devices and device_type not in be.devices:
            continue
        if be.unavailable_reason() is None:
            return be.name
    return None


def set_default(name: str | None) -> None:
    """Set the backend used when none is named (what $RMSNORM_BACKEND sets at import); None: automatic."""
    if name is not None:
        get(name)
    _DEFAULT[0] = name
    _changed()


def default() -> str | None:
    """The backend used when none is named ($RMSNORM_BACKEND at import, or set_default); None: automatic."""
    return _DEFAULT[0]


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    _changed()
    return backend


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {sorted(_REGISTRY)} or None, got {name!r}") from None


def env_default() -> tuple[str | None, str | None]:
    """($RMSNORM_BACKEND as read at import, why it is unusable or None) for ``rmsnorm info``."""
    name = _DEFAULT[0]
    if name is None:
        return None, None
    if name not in _REGISTRY:
        return name, f"not a backend (choose one of {sorted(_REGISTRY)}, or unset it)"
    return name, _REGISTRY[name].unavailable_reason()


def _availability(be: Backend) -> str | None:
    if be.name not in _AVAILABLE:
        with _LOCK:
            if be.name not in _AVAILABLE:
                try:
                    _AVAILABLE[be.name] = be.check_available()
                except Exception as exc:  # a broken toolchain must not break import or selection
                    _AVAILABLE[be.name] = str(exc) or type(exc).__name__
    return _AVAILABLE[be.name]


def reset_availability() -> None:
    """Forget cached availability (tests; after installing a toolchain)."""
    _AVAILABLE.clear()
    _WARNED.clear()
    _changed()


def backends() -> list[BackendInfo]:
    """Every backend, best first, whether it is available here, and why not."""
    out = []
    for be in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        reason = be.unavailable_reason()
        out.append(BackendInfo(be.name, reason is None, reason or "", tuple(sorted(be.devices)),
                               tuple(str(d).removeprefix("torch.") for d in sorted(be.dtypes, key=str)),
                               be.description))
    return out


def select(name: str | None, x: torch.Tensor, residual: torch.Tensor | None, spec: Spec) -> Backend:
    """The backend that runs this call: the one named (or set by $RMSNORM_BACKEND), else the best that fits.

    A backend chosen by name that cannot handle the input raises: there is never a silent fallback.
    """
    source = "backend"
    if name is None:
        name = _DEFAULT[0]
        source = ENV_VAR
    key = (name, x.device, x.dtype, None if residual is None else residual.dtype, spec.out_dtype, spec.round_to)
    be = _SELECT_CACHE.get(key)
    if be is not None:
        return be
    if name is not None:
        if source == ENV_VAR and name not in _REGISTRY:
            raise ValueError(f"{ENV_VAR}={name!r} is not a backend: choose one of {sorted(_REGISTRY)}, or unset it")
        be = get(name)
        why = be.unavailable_reason()
        if why is not None:
            raise RuntimeError(f"{source}={name!r} is not available here: {why}")
        why = be.unsupported_reason(x, residual, spec)
        if why is not None:
            raise ValueError(f"{source}={name!r} cannot handle this input: {why}")
    else:
        be = _auto(x, residual, spec)
    _SELECT_CACHE[key] = be
    return be


def _auto(x: torch.Tensor, residual: torch.Tensor | None, spec: Spec) -> Backend:
    skipped: list[str] = []
    for be in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        if be.auto_devices is not None and x.device.type not in be.auto_devices:
            continue
        if be.unsupported_reason(x, residual, spec) is not None:
            continue
        why = be.unavailable_reason()
        if why is None:
            if skipped and skipped[0] not in _WARNED:
                _WARNED.add(skipped[0])
                warnings.warn(f"rmsnorm: the {skipped[0]} backend is unavailable ({skipped[1]}); "
                              f"using the slower {be.name} backend", RuntimeWarning, stacklevel=5)
            return be
        if not skipped:
            skipped = [be.name, why]
    raise ValueError(f"no rmsnorm backend supports x on {x.device} with dtype {x.dtype}")
