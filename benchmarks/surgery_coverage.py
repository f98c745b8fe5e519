"""Module-level coverage of model surgery over the installed transformers: every RMSNorm-like class and every
nn.LayerNorm subclass, what rmsnorm does with it, and whether the numbers agree.

    python benchmarks/surgery_coverage.py [--out docs/surgery.md] [--limit N]

For each ``transformers.models.*.modeling_*`` module, classes named like a norm (RMSNorm, L2Norm,
T5LayerNorm, LayerNorm subclasses) are instantiated with a hidden size of 64 (or left with the reason),
their gains randomized, and put through ``rmsnorm.accelerate`` (RMSNorm-like classes) or
``rmsnorm.convert(keep_bias=True)`` (LayerNorm subclasses, compared on zero-mean rows). Replaced modules
are compared with the original on random input: fp32 max |Δ| relative to the output's scale, bf16
identical or the max difference in bf16 ulps, and the fp32 input and weight gradients of one backward.
This is per module, not per model: the model-level table (logits and gradients of tiny models) is made by
benchmarks/surgery_models.py.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import pkgutil
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import rmsnorm

NAME = re.compile(r"(RMSNorm|L2Norm|T5LayerNorm|LayerNorm|RMSNormGated)$")


def candidates(limit: int | None = None):
    import transformers.models as tm

    seen = set()
    for info in pkgutil.iter_modules(tm.__path__):
        family = info.name
        try:
            pkg = importlib.import_module(f"transformers.models.{family}")
        except Exception:
            continue
        for sub in pkgutil.iter_modules(pkg.__path__):
            if not sub.name.startswith("modeling_"):
                continue
            try:
                mod = importlib.import_module(f"transformers.models.{family}.{sub.name}")
            except Exception:
                continue
            for name, cls in vars(mod).items():
                if (inspect.isclass(cls) and issubclass(cls, nn.Module) and NAME.search(name)
                        and cls.__module__ == mod.__name__ and cls not in seen):
                    seen.add(cls)
                    yield family, cls
                    if limit and len(seen) >= limit:
                        return


def instantiate(cls, family: str, d: int = 64):
    """An instance with a hidden size of d: from the size itself, a shape, no arguments, a group size, or
    the family's default config made small (benchmarks/surgery_models.py's shrink: hidden size 64)."""
    for args, kwargs in (((d,), {}), (((d,),), {}), ((), {}), ((d,), {"group_size": 16})):
        try:
            return cls(*args, **kwargs)
        except Exception:
            continue
    try:
        from surgery_models import shrink
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(family)
        shrink(cfg)
        return cls(getattr(cfg, "text_config", None) or cfg)
    except Exception:
        return None


class WithGate(nn.Module):
    """A gated norm called with a fixed gate (cast to the input's dtype), so it is called as norm(x)."""

    def __init__(self, norm: nn.Module, z: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("z", z, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.z.to(x.dtype))


def gated(cls) -> bool:
    """A gated norm: called as norm(x, gate)."""
    try:
        return "gate" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def unclaimed(m: nn.Module) -> str:
    """Why a module no surgery looked at was left: a mean-subtracting norm (its output does not move when
    every input of a row moves by the same amount) is a LayerNorm, not an RMSNorm."""
    children = sorted({type(c).__name__ for c in m.children()})
    if children:
        return f"a layer, not a norm: it holds {', '.join(children[:4])} (an nn.LayerNorm among them is convert()'s)"
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            a, b = m(x), m(x + 3.0)
        centered = isinstance(a, torch.Tensor) and torch.allclose(a, b, rtol=1e-3, atol=1e-3)
    except Exception as exc:  # a module that needs other inputs
        return f"not named like an RMSNorm, and not an nn.LayerNorm subclass (not probed: {type(exc).__name__})"
    if centered:
        return ("a LayerNorm (subtracts the mean: a constant shift of a row leaves its output unchanged), not an "
                "nn.LayerNorm subclass: no RMSNorm reproduces it")
    return "not named like an RMSNorm, and not an nn.LayerNorm subclass"


def check(family: str, cls) -> dict:
    row = {"family": family, "class": cls.__name__, "kind": "LayerNorm subclass" if issubclass(cls, nn.LayerNorm)
           else "RMSNorm-like"}
    torch.manual_seed(0)  # the same gains and inputs every run: the table changes only when results do
    m = instantiate(cls, family)
    if m is None:
        return {**row, "result": "left: needs constructor arguments this table does not guess"}
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand_like(p) * 0.8 + 0.1)
    holder = nn.ModuleDict({"norm": copy.deepcopy(m)})
    try:
        report = (rmsnorm.convert(holder, keep_bias=True) if issubclass(cls, nn.LayerNorm)
                  else rmsnorm.accelerate(holder))
    except Exception as exc:
        return {**row, "result": f"error: {type(exc).__name__}: {str(exc)[:120]}"}
    if not report.changed:
        why = report.skipped[0][1] if report.skipped else unclaimed(m)
        return {**row, "result": f"left: {why}"}
    new = holder["norm"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g)
    z = torch.randn(3, 5, 64, generator=g)
    if issubclass(cls, nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)  # convert() is exact on zero-mean rows only
    if gated(cls):  # both called with the same gate
        m, new = WithGate(m, z), WithGate(new, z)
    try:
        ref = m(x)
        out = new(x)
    except Exception as exc:
        return {**row, "result": f"replaced, but the forward failed: {type(exc).__name__}: {str(exc)[:100]}"}
    scale = 1 + ref.abs().max().item()
    d32 = (out - ref).abs().max().item() / scale
    if issubclass(cls, nn.LayerNorm):
        # convert() is an approximation for training: equal outputs on zero-mean fp32 rows is what it promises
        # (bf16 rounding breaks the zero mean, and LayerNorm's gradient projects the mean out: not comparable)
        return {**row, "result": report.changed[0][1], "fp32_rel": d32, "bf16_ulps": None, "grad_rel": None}
    mb, nb = copy.deepcopy(m).to(torch.bfloat16), copy.deepcopy(new).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    try:
        rb = mb(xb)
    except Exception:  # the original itself does not run in bf16 (mixed-dtype parameters): nothing to match
        ulps = float("nan")
    else:
        ob = nb(xb)
        ulps = ((ob.float() - rb.float()).abs() / (rb.float().abs().clamp_min(1e-3) * 2 ** -7)).max().item()
    xa, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    m(xa).square().sum().backward()
    new(xc).square().sum().backward()
    dg = (xa.grad - xc.grad).abs().max().item() / (1 + xa.grad.abs().max().item())
    wa = [p.grad for p in m.parameters()]
    wc = [p.grad for p in new.parameters()]
    dw = max(((a - c).abs().max().item() / (1 + a.abs().max().item()) for a, c in zip(wa, wc)
              if a is not None and c is not None), default=0.0)
    return {**row, "result": report.changed[0][1], "fp32_rel": d32, "bf16_ulps": ulps, "grad_rel": max(dg, dw)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/surgery.md"))
    ap.add_argument("--limit", type=int, default=None, help="stop after this many classes (a quick subset)")
    args = ap.parse_args()
    import transformers

    rows = [check(f, c) for f, c in candidates(args.limit)]
    ok = [r for r in rows if "fp32_rel" in r]
    good = [r for r in ok if r["fp32_rel"] <= 1e-5 and not (r["bf16_ulps"] or 0) > 1 and (r["grad_rel"] or 0) <= 1e-4]
    lines = [
        "# Surgery coverage (module level)",
        "",
        f"Made by `python benchmarks/surgery_coverage.py` on {time.strftime('%Y-%m-%d')} with transformers "
        f"{transformers.__version__}, torch {torch.__version__}: every RMSNorm-like class and LayerNorm subclass "
        "in the installed transformers, instantiated with a hidden size of 64, gains randomized, replaced by "
        "`rmsnorm.accelerate` (RMSNorm-like) or `rmsnorm.convert(keep_bias=True)` (LayerNorm subclasses, on zero-mean "
        "rows, where RMSNorm equals LayerNorm), and compared with the original: fp32 max |Δ| over (1 + max|y|), "
        "bf16 max difference in bf16 ulps, fp32 input and gain gradients of one backward (RMSNorm-like classes "
        "only: for LayerNorm subclasses convert() promises equal outputs on zero-mean rows, not equal gradients; "
        "n/a). Model-level checks (logits and gradients of tiny models of every family) are in "
        "[surgery-models.md](surgery-models.md).",
        "",
        f"{len(rows)} classes: {len(ok)} replaced and compared, {len(good)} within the targets (fp32 ≤ 1e-5, "
        f"bf16 ≤ 1 ulp, gradients ≤ 1e-4), {len(rows) - len(ok)} left with the reason.",
        "",
        "| family | class | kind | result | fp32 rel | bf16 ulps | grads rel |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "fp32_rel" not in r:
            nums = "– | – | –"
        elif r["bf16_ulps"] is None:
            nums = f"{r['fp32_rel']:.1e} | n/a | n/a"
        else:
            nums = f"{r['fp32_rel']:.1e} | {r['bf16_ulps']:.2f} | {r['grad_rel']:.1e}"
        lines.append(f"| {r['family']} | {r['class']} | {r['kind']} | {r['result']} | {nums} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
