"""``rmsnorm.convert``: replace nn.LayerNorm modules with rmsnorm.RMSNorm (in place)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from ..args import check_options
from ..module import RMSNorm
from .report import SurgeryReport, set_submodule


def _globs(name: str, value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a glob string or a sequence of them, got {value!r}")
    return list(value)


def convert(model: nn.Module, *, include: str | Sequence[str] | None = None,
            exclude: str | Sequence[str] | None = None, p: float = 1.0, keep_bias: bool = False,
            exact: bool = False) -> SurgeryReport:
    """Replace the model's nn.LayerNorm modules with RMSNorm, in place; return a report.

    Modules are selected by their qualified names with fnmatch globs (``include`` default: all;
    ``exclude`` wins). Each RMSNorm takes the LayerNorm's shape, eps and gain (and its bias when
    ``keep_bias``), so a model can be fine-tuned after the swap; it is not the same function unless the
    inputs have zero mean. ``exact=True`` instead applies the exact Pre-LN -> Pre-RMSNorm transformation
    (Jiang et al. 2023) to GPT-2-style models: see :func:`rmsnorm.surgery.exact.convert_exact`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inc, exc = _globs("include", include), _globs("exclude", exclude)
    check_options(None, "inside", p, "ceil", 0.0, "fp32")
    if exact:
        from .exact import convert_exact

        if inc is not None or exc is not None or p != 1.0 or keep_bias:
            raise ValueError("exact=True converts every LayerNorm of the model and keeps it exact: "
                             "include, exclude, p and keep_bias do not apply")
        return convert_exact(model)
    report = SurgeryReport("convert LayerNorm -> RMSNorm")
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.LayerNorm):
            continue
        if inc is not None and not any(fnmatch.fnmatchcase(name, g) for g in inc):
            report.skipped.append((name, "not matched by include"))
            continue
        if exc is not None and any(fnmatch.fnmatchcase(name, g) for g in exc):
            report.skipped.append((name, "matched by exclude"))
            continue
        new = RMSNorm.from_layernorm(module, keep_bias=keep_bias, p=p)
        new.train(module.training)
        set_submodule(model, name, new)
        dropped = " (bias dropped)" if module.bias is not None and not keep_bias else ""
        report.changed.append((name, f"LayerNorm{tuple(module.normalized_shape)} -> RMSNorm(p={p}){dropped}"))
    if inc is not None and not report.changed:
        report.skipped.append(("", f"no LayerNorm matched include={inc}"))
    return report
