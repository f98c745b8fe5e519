"""``rmsnorm.convert``: replace nn.LayerNorm modules with rmsnorm.RMSNorm (in place)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..args import check_options
from ..module import RMSNorm
from .report import SurgeryReport, set_submodule
from .transaction import move_hooks, transaction


def layernorm_gain_offset(module: nn.LayerNorm) -> tuple[float | None, str]:
    """The gain offset of a LayerNorm (sub)class: 0.0 for y = LN(x) * w + b, 1.0 for the "1P" form
    y = LN(x) * (1 + w) + b; None (and why) for anything else, which cannot become an RMSNorm gain.

    nn.LayerNorm's own forward is trusted; a subclass with its own forward is run once on a probe
    input and compared with both forms.
    """
    if type(module).forward is nn.LayerNorm.forward:
        return 0.0, "nn.LayerNorm forward"
    name = type(module).__name__
    w, b = module.weight, module.bias
    ns = tuple(module.normalized_shape)
    if w is not None and tuple(w.shape) != ns:
        return None, f"{name}: weight of shape {tuple(w.shape)} for normalized shape {ns}"
    ref = w if w is not None else b
    device = ref.device if ref is not None else torch.device("cpu")
    if device.type == "meta" or (ref is not None and ref.numel() == 0):
        return None, f"{name}: its parameters are not materialised (meta or partitioned); cannot check its forward"
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, *ns, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    try:
        with torch.no_grad():
            y = module(x)
    except Exception as exc:  # a forward that needs more than a tensor
        return None, f"{name}: its forward could not be checked on a probe input ({type(exc).__name__}: {exc})"
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None, f"{name}: its forward does not return a tensor of its input's shape"
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    with torch.no_grad():
        for offset in (0.0, 1.0):
            gain = None if w is None else w.float() + offset
            expect = F.layer_norm(x.float(), ns, gain, None if b is None else b.float(), module.eps)
            if (y.float() - expect).abs().max().item() <= tol * (1 + expect.abs().max().item()):
                return offset, "LayerNorm with gain 1 + w" if offset else "LayerNorm forward (checked)"
    return None, f"{name}: its forward is not LayerNorm's (neither w nor 1 + w as the gain)"


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
    (Jiang et al. 2023) to the Pre-LN families it holds for (GPT-2, GPTBigCode, GPT-Neo, GPT-J, CodeGen,
    pre-LN OPT, GPT-NeoX, Phi-1/2, Falcon, StableLM):
    see :func:`rmsnorm.surgery.exact.convert_exact`. LayerNorm subclasses are converted by what their
    forward computes (gain 1 + w: offset=1) or left, with the reason in the report. All or nothing: after
    an error the model is exactly as before.
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
    plan = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.LayerNorm):
            continue
        if inc is not None and not any(fnmatch.fnmatchcase(name, g) for g in inc):
            report.skipped.append((name, "not matched by include"))
            continue
        if exc is not None and any(fnmatch.fnmatchcase(name, g) for g in exc):
            report.skipped.append((name, "matched by exclude"))
            continue
        if name == "":
            raise ValueError(f"model surgery replaces submodules in place and cannot replace the model itself "
                             f"({type(model).__name__}); pass the model that contains the norm")
        offset, why = layernorm_gain_offset(module)
        if offset is None:
            report.skipped.append((name, why))
            continue
        if offset and module.weight is None:
            report.skipped.append((name, f"{type(module).__name__}: gain 1 + w without a weight"))
            continue
        plan.append((name, module, offset))
    # every replacement is built before the first one is put in place; then all go in, or none
    built = [(name, module, RMSNorm.from_layernorm(module, keep_bias=keep_bias, p=p, offset=offset))
             for name, module, offset in plan]
    with transaction(model):
        for name, module, new in built:
            new.train(module.training)
            hooks = move_hooks(module, new)
            set_submodule(model, name, new)
            dropped = " (bias dropped)" if module.bias is not None and not keep_bias else ""
            gain = ", gain 1 + w" if new.offset else ""
            moved = f", hooks moved: {', '.join(hooks)}" if hooks else ""
            report.changed.append((name, f"{type(module).__name__}{tuple(module.normalized_shape)} -> "
                                         f"RMSNorm(p={p}{gain}){dropped}{moved}"))
    if inc is not None and not report.changed:
        report.skipped.append(("", f"no LayerNorm matched include={inc}"))
    return report
