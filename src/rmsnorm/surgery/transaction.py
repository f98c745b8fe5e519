"""All-or-nothing model surgery: after an error the model is exactly as it was.

A :class:`Transaction` records, before the first change, everything a surgery may change: each module's
child, parameter and buffer tables (so replaced modules and ties come back), its hooks, the data of every
tensor written in place (:meth:`Transaction.write`) and any attribute set on other objects, such as a
config (:meth:`Transaction.setattr`). On an exception inside ``with transaction(model)`` all of it is put
back and the exception is re-raised with a note that the model was left unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                "_state_dict_hooks", "_load_state_dict_pre_hooks")


class SurgeryError(RuntimeError):
    """A surgery failed; the model was restored to its state before the call."""


class Transaction:
    def __init__(self, model: nn.Module) -> None:
        self.modules: list[tuple[nn.Module, dict[str, Any]]] = []
        for m in model.modules():
            tables = {"_modules": dict(m._modules), "_parameters": dict(m._parameters),
                      "_buffers": dict(m._buffers), "training": m.training}
            for t in _HOOK_TABLES:
                if hasattr(m, t):
                    tables[t] = type(getattr(m, t))(getattr(m, t))
            self.modules.append((m, tables))
        self.tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attrs: list[tuple[object, str, bool, Any]] = []

    def write(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """``tensor.copy_(value)`` without autograd, remembering the old data the first time."""
        if id(tensor) not in self.tensors:
            self.tensors[id(tensor)] = (tensor, tensor.detach().clone())
        with torch.no_grad():
            tensor.copy_(value)

    def setattr(self, obj: object, name: str, value: Any) -> None:
        self.attrs.append((obj, name, hasattr(obj, name), getattr(obj, name, None)))
        setattr(obj, name, value)

    def rollback(self) -> None:
        for obj, name, had, old in reversed(self.attrs):
            if had:
                setattr(obj, name, old)
            else:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
        with torch.no_grad():
            for tensor, old in self.tensors.values():
                tensor.copy_(old)
        for m, tables in self.modules:
            for key, value in tables.items():
                if key == "training":
                    m.training = value
                else:
                    table = getattr(m, key)
                    table.clear()
                    table.update(value)


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[Transaction]:
    tx = Transaction(model)
    try:
        yield tx
    except Exception as exc:
        tx.rollback()
        raise SurgeryError(f"{type(exc).__name__}: {exc} (the model was left unchanged)") from exc


def move_hooks(old: nn.Module, new: nn.Module) -> list[str]:
    """Give ``new`` the forward/backward hooks registered on ``old`` (its replacement); returns their kinds."""
    moved = []
    for t in _HOOK_TABLES[:7]:
        table = getattr(old, t, None)
        if table:
            getattr(new, t).update(table)
            moved.append(t.strip("_"))
    return moved
