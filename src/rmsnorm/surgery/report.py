"""The report every surgery returns: what changed, what was left and why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SurgeryReport:
    """``changed``: (module name, what was done); ``skipped``: (module name, why it was left)."""

    operation: str
    changed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.changed)

    def __str__(self) -> str:
        lines = [f"{self.operation}: {len(self.changed)} module(s) changed, {len(self.skipped)} left"]
        lines += [f"  changed {name or '<root>'}: {what}" for name, what in self.changed]
        lines += [f"  left    {name or '<root>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def set_submodule(root, name: str, module) -> None:
    """Put ``module`` at ``name`` inside ``root``; the root itself cannot be replaced in place."""
    if name == "":
        raise ValueError(f"model surgery replaces submodules in place and cannot replace the model itself "
                         f"({type(root).__name__}); pass the model that contains the norm")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
