"""rmsnorm as a layer of the ``kernels`` package (the switch transformers users already use).

transformers tags its RMSNorm classes with ``use_kernel_forward_from_hub("RMSNorm")``; ``kernels.kernelize``
then replaces their ``forward`` with the layer a kernel mapping names for the device and mode. This
module is such a mapping, backed by rmsnorm instead of a downloaded kernel::

    from kernels import Mode, kernelize, use_kernel_mapping
    from rmsnorm.hub import kernel_mapping

    with use_kernel_mapping(kernel_mapping()):
        model = kernelize(model, mode=Mode.TRAINING | Mode.TORCH_COMPILE, device="cpu")

The layer keeps each module's numerics: it recognises the family of the class whose forward it replaces
(the table of :mod:`rmsnorm.surgery.accelerate`: Llama's cast, Gemma's 1 + w, T5's gain dtype, ...); a
class it does not recognise keeps its own forward.

accelerate() or the hub? :func:`rmsnorm.accelerate` replaces the modules with ``rmsnorm.RMSNorm``
(visible in the model, parameters shared, works without the ``kernels`` package); the hub keeps every
module and swaps only its forward, selected per device and mode, alongside the other hub kernels of a
model. Both compute the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from .functional import rms_norm
from .surgery.accelerate import FAMILY_NUMERICS, family_of, module_eps

LAYER_NAME = "RMSNorm"


_OPTIONS: dict[type, tuple[str, float] | None] = {}


def _options(cls: type) -> tuple[str, float] | None:
    """(cast, offset) reproducing ``cls.forward``, or None for a class of no known family. The family is read
    from the class's source (which the compiler does not trace): classes are resolved when the layer is
    loaded (kernelize, eagerly) and on a first eager call; under compilation an unresolved class keeps its
    own forward."""
    if cls not in _OPTIONS:
        if torch.compiler.is_compiling():
            return None
        family = family_of(cls)  # gemma4 and torch: fp32 numerics with their own (optional) gain
        # the other families (gated: a second argument; gainless; grouped) keep their own forward under the hub
        own_gain = ("fp32", 0.0) if family in ("gemma4", "torch") else None
        _OPTIONS[cls] = FAMILY_NUMERICS.get(family, own_gain) if family is not None else None
    return _OPTIONS[cls]


def _tagged_classes(root: type = nn.Module) -> list[type]:
    """Module classes tagged for this layer (``use_kernel_forward_from_hub("RMSNorm")``), loaded so far."""
    found: list[type] = []
    stack: list[type] = [root]
    seen: set[type] = set()
    while stack:
        subclasses: list[type] = stack.pop().__subclasses__()
        for sub in subclasses:
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                if getattr(sub, "kernel_layer_name", None) == LAYER_NAME:
                    found.append(sub)
    return found


def hub_forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The forward the layer gives ``module``: rms_norm with the options of its family, or its own forward."""
    options = _options(type(module))
    if options is None:
        return type(module).forward(module, hidden_states)
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(module, "with_scale", True) is False:
        weight = None
    cast, offset = options
    return rms_norm(hidden_states, weight, eps=module_eps(module), cast=cast, offset=offset)


class RMSNorm(nn.Module):
    """The kernel layer (stateless, as ``kernels`` requires: it uses the attributes of the module whose
    forward it replaces)."""

    can_torch_compile = True
    has_backward = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hub_forward(self, hidden_states)


class RmsnormRepository:
    """A ``kernels`` layer repository whose layer is :class:`RMSNorm` (nothing is downloaded)."""

    layer_name = LAYER_NAME

    def load(self) -> type[nn.Module]:
        for cls in _tagged_classes():  # kernelize loads the layer eagerly: resolve the families now
            _options(cls)
        return RMSNorm

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RmsnormRepository)

    def __hash__(self) -> int:
        return hash(("rmsnorm", LAYER_NAME))

    def __str__(self) -> str:
        return "rmsnorm (layer RMSNorm)"


def kernel_mapping(devices: tuple[str, ...] = ("cpu", "cuda")) -> dict:
    """The mapping for ``kernels.use_kernel_mapping`` / ``register_kernel_mapping``: layer "RMSNorm" on
    each of ``devices``, every mode."""
    return {LAYER_NAME: {device: RmsnormRepository() for device in devices}}
