"""``rmsnorm.accelerate``: replace modules that already compute RMSNorm with rmsnorm.RMSNorm, numerics kept.

Families are recognised by what their ``forward`` computes, not only by name: the source of a module's
``forward`` (and ``_norm``) with its class name, docstrings and comments removed is compared with the
known families of Hugging Face transformers. That covers the 180 or so RMSNorm classes there that are
copies of a few implementations (LlamaRMSNorm is repeated in about 140 models). A module named like an
RMSNorm (or named LayerNorm without being an nn.LayerNorm, as CPM-Ant's RMSNorm) whose source is not a known
family's is probed (``probe_family``): a copy of it is run on inputs in fp32, bf16 and fp16 with random
gains, and the first family whose replacement returns the same bits in the same dtype on the reference
backend is taken; otherwise the module is left and the report says why (a LayerNorm-named one silently).
Instances are replaced and share the original parameters; no class is patched.

Presets (families, examples; numerics):

- llama: Llama, Mistral, Mixtral, Qwen2/2.5/3, Phi-3, DeepSeek, Granite, GLM; fp32 statistics, the
  normalized x cast to the input dtype before the gain (cast="llama").
- gemma: Gemma, Gemma 2/3, RecurrentGemma; gain 1 + w (offset=1), all fp32, output in the input dtype.
- olmo: OLMo hybrid, FlexOlmo, AFMoE, Helium, Nemotron-H, Moshi; all fp32 (gain included, in fp32 or cast
  to it), output in the input dtype.
- gemma4: Gemma 3n/4, Muse (``with_scale``); all fp32, optional gain, output in the input dtype (without
  a gain or a dim: a LastDimRMSNorm).
- gemma_grouped: Qwen4-Exp; gain 1 + w (offset=1), optionally by groups of ``group_size``, all fp32.
- t5: T5, LongT5, UMT5, Switch, Pix2Struct, Idefics; fp32 statistics, rounded to a half-precision gain's
  dtype, output in the gain's dtype (cast="t5": follows the gain through .to() / .half()).
- llama4: Llama 4's text RMSNorm (normalized in fp32, rounded to the input dtype, times the gain:
  cast="llama"); l2norm: its gainless Llama4TextL2Norm (and Inkling-2's unweighted RMSNorm) over the last
  dimension (a LastDimRMSNorm).
- l2norm_rstd: DeepSeek-V4's and GLM-5 Next's unweighted RMSNorm, ``x * rsqrt(ms + eps).to(x.dtype)``: the
  inverse RMS rounded to x's dtype before it multiplies (a LastDimRMSNorm with cast="rstd"). Probing also
  tries the gained form of that rounding (rstd: an RMSNorm with cast="rstd").

Partitioned parameters (DeepSpeed ZeRO-3 leaves a weight of shape [0] and records the full shape as
``ds_shape``) are shared as they are; the replacement takes its shape from ``ds_shape``.
- torch: torch.nn.RMSNorm; torch's numerics (cast="fp32").
- gated (replaced by rmsnorm.GatedRMSNorm, called as ``norm(x, gate)``): Mamba-2, Bamba, Zamba2,
  Nemotron-H, GraniteMoeHybrid (the norm of x * silu(z) by groups, cast="llama"); Qwen3-Next, Qwen3.5,
  OLMo hybrid (the norm, then times act(z), cast="llama"); Kimi Linear, Bailing hybrid, GLM-5 Next,
  LaraMini (the same in fp32); Falcon-H1 (groups from n_groups, before or after from norm_before_gate,
  fp32). The fused gated kernels run them (cpu; triton for rows and groups that fit its row kernel).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap

import torch
from torch import nn

from ..module import GatedRMSNorm, RMSNorm
from .report import SurgeryReport, set_submodule
from .transaction import move_hooks, transaction

_FAMILIES = {
    "llama": """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
""",
    "gemma": """
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
""",
    "olmo": ("""
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return (self.weight * hidden_states).to(input_dtype)
""", """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)
""", """
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
def forward(self, x):
    output = self._norm(x.float())
    output = output * self.weight.float()
    return output.type_as(x)
"""),
    "t5": """
def forward(self, hidden_states):
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states
""",
    "llama4": """
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
def forward(self, x):
    output = self._norm(x.float()).type_as(x)
    return output * self.weight
""",
    "l2norm": ("""
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
def forward(self, x):
    return self._norm(x.float()).type_as(x)
""", """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.float()
    hidden_states = hidden_states * torch.rsqrt(hidden_states.square().mean(-1, keepdim=True) + self.eps)
    return hidden_states.to(input_dtype)
"""),
    "l2norm_rstd": """
def forward(self, x):
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype)
""",
    "gemma_grouped": """
def _norm(self, x):
    if self.group_size is not None:
        x = x.reshape(*x.shape[:-1], -1, self.group_size)
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return out.flatten(-2) if self.group_size is not None else out
def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
""",
    "gemma4": """
def _norm(self, hidden_states):
    mean_squared = hidden_states.pow(2).mean(-1, keepdim=True) + self.eps
    return hidden_states * torch.pow(mean_squared, -0.5)
def forward(self, hidden_states):
    normed_output = self._norm(hidden_states.float())
    if self.with_scale:
        normed_output = normed_output * self.weight.float()
    return normed_output.type_as(hidden_states)
""",
    "gated_before": """
def forward(self, hidden_states, gate=None):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    if gate is not None:
        hidden_states = hidden_states * nn.functional.silu(gate.to(torch.float32))
    *prefix_dims, last_dim = hidden_states.shape
    group_count = last_dim // self.group_size
    hidden_states_group = hidden_states.view(*prefix_dims, group_count, self.group_size)
    variance = hidden_states_group.pow(2).mean(-1, keepdim=True)
    hidden_states_group = hidden_states_group * torch.rsqrt(variance + self.variance_epsilon)
    hidden_states = hidden_states_group.view(*prefix_dims, group_count * self.group_size)
    return self.weight * hidden_states.to(input_dtype)
""",
    "gated_after": """
def forward(self, hidden_states, gate):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    hidden_states = self.weight * hidden_states.to(input_dtype)
    hidden_states = hidden_states * ACT2FN[self.activation](gate.to(torch.float32))
    return hidden_states.to(input_dtype)
""",
    "gated_after_fp32": """
def forward(self, hidden_states, gate=None):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    hidden_states = self.weight.to(torch.float32) * hidden_states
    hidden_states = hidden_states * ACT2FN[self.activation](gate.to(torch.float32))
    return hidden_states.to(input_dtype)
""",
    "gated_falcon": """
def forward(self, hidden_states, gate=None):
    input_dtype = hidden_states.dtype
    input_ndim = hidden_states.ndim
    if not self.norm_before_gate and gate is not None:
        hidden_states = hidden_states * F.silu(gate.to(torch.float32))
    if len(hidden_states.shape) == 3:
        batch_size, seq_len, dim = hidden_states.shape
    else:
        batch_size, dim = hidden_states.shape
        seq_len = 1
    hidden_states = hidden_states.to(torch.float32)
    hidden_states = hidden_states.view(batch_size, seq_len, self.n_groups, int(dim // self.n_groups))
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    hidden_states = self.weight.view(self.n_groups, int(dim // self.n_groups)) * hidden_states
    hidden_states = hidden_states.view(batch_size, seq_len, dim)
    if input_ndim == 2:
        hidden_states = hidden_states.squeeze(1)
    if self.norm_before_gate and gate is not None:
        hidden_states = hidden_states * F.silu(gate.to(torch.float32))
    return hidden_states.to(input_dtype)
""",
}

# gated families: (gate_mode, cast); called as norm(x, gate), replaced by rmsnorm.GatedRMSNorm
GATED = {"gated_before": ("before", "llama"), "gated_after": ("after", "llama"), "gated_after_fp32": ("after", "fp32"),
         "gated_falcon": ("", "fp32")}  # Falcon-H1: the mode from norm_before_gate, groups from n_groups


def _normalize(code: str, class_name: str | None = None) -> str:
    """Source of forward/_norm without annotations, docstrings and comments, the class name replaced."""
    tree = ast.parse(textwrap.dedent(code))
    funcs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in ("forward", "_norm"):
            node.returns = None
            for a in node.args.args:
                a.annotation = None
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                node.body = node.body[1:] or [ast.Pass()]
            funcs.append(node)
    funcs.sort(key=lambda f: f.name)
    text = "\n".join(ast.unparse(f) for f in funcs)
    return text.replace(class_name, "CLS") if class_name else text


# a family may be written several ways (the same numerics): each is recognised
_KNOWN = {_normalize(src): name for name, srcs in _FAMILIES.items()
          for src in ((srcs,) if isinstance(srcs, str) else srcs)}


@functools.cache
def family_of(cls: type) -> str | None:
    """The known family whose computation ``cls.forward`` repeats, or None."""
    if issubclass(cls, nn.RMSNorm):
        return "torch"
    parts = []
    for meth in ("forward", "_norm"):
        fn = cls.__dict__.get(meth)
        if fn is not None:
            try:
                parts.append(inspect.getsource(fn))
            except (OSError, TypeError):
                return None
    if not parts:
        return None
    try:
        return _KNOWN.get(_normalize("\n".join(textwrap.dedent(p) for p in parts), cls.__name__))
    except SyntaxError:
        return None


# (cast, gain offset) that reproduce each family whose gain is a plain weight; gemma4 (optional gain),
# torch (its own options) and the LAST_DIM families (no gain, no fixed shape) are built apart in replacement().
FAMILY_NUMERICS: dict[str, tuple[str, float]] = {"llama": ("llama", 0.0), "llama4": ("llama", 0.0),
                                                 "gemma": ("fp32", 1.0), "olmo": ("fp32", 0.0), "t5": ("t5", 0.0),
                                                 "rstd": ("rstd", 0.0)}
# gainless families over the last dimension (LastDimRMSNorm) and their cast
LAST_DIM = {"l2norm": "llama", "l2norm_rstd": "rstd"}


def module_eps(module: nn.Module, default: float | None = 1e-6) -> float | None:
    """The eps a family's module stores (``variance_epsilon`` or ``eps``), else ``default``."""
    for attr in ("variance_epsilon", "eps"):
        if hasattr(module, attr):
            return getattr(module, attr)
    return default


class LastDimRMSNorm(nn.Module):
    """Gainless RMSNorm over the last dimension of whatever it is given (shape fixed by no parameter):
    fp32 statistics, the result rounded to the input's dtype (Llama 4's L2 norm; ``cast="rstd"``: with the
    inverse RMS rounded to it first, as DeepSeek-V4's unweighted norm)."""

    def __init__(self, eps: float, backend: str | None = None, cast: str = "llama") -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.cast = cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..functional import rms_norm

        return rms_norm(x, eps=self.eps, cast=self.cast, backend=self.backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps}" + (f", cast={self.cast!r}" if self.cast != "llama" else "")


def _shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The parameter's full shape, also when it is partitioned (DeepSpeed ZeRO-3 keeps it in ds_shape)."""
    return tuple(getattr(weight, "ds_shape", None) or weight.shape)


def replacement(module: nn.Module, family: str, backend: str | None = None) -> nn.Module:
    """An RMSNorm reproducing ``module`` (of a known family) and sharing its parameters (``backend``: the
    replacement's backend, None for the automatic choice)."""
    weight = getattr(module, "weight", None)
    new: nn.Module
    if family == "torch":
        assert isinstance(module, nn.RMSNorm)
        new = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, backend=backend)
    elif family in LAST_DIM:
        eps_l2 = module_eps(module)
        assert eps_l2 is not None  # the default is a float
        new = LastDimRMSNorm(eps_l2, backend, LAST_DIM[family])
    else:
        if not isinstance(weight, nn.Parameter) and not (family == "gemma4" and weight is None):
            raise ValueError(f"{type(module).__name__} has no weight parameter")
        shape = _shape(weight) if weight is not None else None
        if shape is not None and 0 in shape:
            raise ValueError(f"{type(module).__name__}'s weight is empty {shape} and records no full shape")
        eps = module_eps(module)
        if family in FAMILY_NUMERICS:
            assert shape is not None
            cast, offset = FAMILY_NUMERICS[family]
            new = RMSNorm(shape, eps, cast=cast, offset=offset, backend=backend)
        elif family in GATED:
            assert shape is not None
            mode, cast = GATED[family]
            act = getattr(module, "activation", "silu")
            if act not in ("silu", "sigmoid"):
                raise ValueError(f"{type(module).__name__}'s gate activation {act!r} is not silu or sigmoid")
            group = getattr(module, "group_size", None) if mode == "before" else None
            if family == "gated_falcon":
                mode = "after" if getattr(module, "norm_before_gate", True) else "before"
                groups = getattr(module, "n_groups", 1)
                if not isinstance(groups, int) or groups < 1 or shape[-1] % groups:
                    raise ValueError(f"{type(module).__name__}'s n_groups {groups!r} does not divide {shape[-1]}")
                group = shape[-1] // groups if groups > 1 else None
            elif mode == "before" and not isinstance(group, int):
                raise ValueError(f"{type(module).__name__} has no int group_size")
            new = GatedRMSNorm(shape, eps, cast=cast, gate_mode=mode, gate_act=act, group_size=group, backend=backend)
        elif family == "gemma_grouped":  # gain 1 + w, optionally by groups of group_size
            assert shape is not None
            group = getattr(module, "group_size", None)
            if group is not None and (not isinstance(group, int) or group < 1 or shape[-1] % group):
                raise ValueError(f"{type(module).__name__}'s group_size {group!r} does not divide {shape[-1]}")
            new = RMSNorm(shape, eps, offset=1.0, group_size=group, backend=backend)
        elif family == "gemma4":
            with_scale = bool(getattr(module, "with_scale", weight is not None))
            if shape is None:
                dim = getattr(module, "dim", None)
                if isinstance(dim, int):
                    shape = (dim,)
            if shape is None and not with_scale:  # no gain and no fixed shape: over the last dimension
                assert eps is not None
                new = LastDimRMSNorm(eps, backend)
            elif shape is None:
                raise ValueError(f"{type(module).__name__} has a gain but neither a weight nor an int dim")
            else:
                new = RMSNorm(shape, eps, elementwise_affine=with_scale, backend=backend)
        else:
            raise ValueError(f"unknown family {family!r}")
    if getattr(new, "weight", None) is not None:
        new.weight = weight  # type: ignore[assignment]  # a Parameter (checked above), shared
    new.train(module.training)
    return new


# families a module of unknown source is checked against (gained; gainless), in order of preference
PROBED: tuple[str, ...] = ("llama", "gemma", "olmo", "t5", "rstd")
PROBED_GAINLESS: tuple[str, ...] = ("l2norm", "l2norm_rstd")
_PROBE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _probe_inputs(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows of several scales (1, 1e-3, 1e3, 0, about sqrt(eps)) over n elements, in ``dtype``."""
    x = torch.randn(5, 3, n, generator=gen, dtype=torch.float64)
    x = x * torch.tensor([1.0, 1e-3, 1e3, 0.0, 1e-4], dtype=torch.float64).view(5, 1, 1)
    return x.to(dtype)


def probe_family(module: nn.Module) -> tuple[str | None, str]:
    """(family, how) of a module whose source is not a known family's, found by running a copy of it:
    the first family in PROBED (PROBED_GAINLESS without a weight) whose replacement, on the reference
    backend, returns the copy's output bit for bit and in the same dtype for every probe: inputs in fp32,
    bf16 and fp16, rows of several scales including zero, random gains in fp32 and bf16. (None, why) when
    none does. The module itself is not called (its hooks do not fire) and not changed."""
    import copy

    name = type(module).__name__
    weight = getattr(module, "weight", None)
    extra = sorted(n for n, _ in module.named_parameters(recurse=False) if n != "weight")
    if extra:
        return None, f"{name}: forward is not a known RMSNorm family (it has parameters besides a gain: {extra})"
    if module_eps(module, None) is None:
        if any(True for _ in module.children()):
            return None, f"{name}: wraps other modules (a norm among them is replaced on its own)"
        return None, f"{name}: forward is not a known RMSNorm family and it stores no eps to check one against"
    if weight is not None:
        if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or weight.numel() == 0 \
                or weight.device.type not in ("cpu", "cuda"):
            return None, f"{name}: forward is not a known RMSNorm family (its weight cannot be probed)"
        families, n = PROBED, weight.numel()
    else:
        families, n = PROBED_GAINLESS, 24
    try:
        clone = copy.deepcopy(module)
    except Exception as exc:  # anything a user's module may raise while copied
        return None, f"{name}: forward is not a known RMSNorm family and it cannot be copied to probe ({exc})"
    gen = torch.Generator().manual_seed(0)
    device = weight.device if weight is not None else torch.device("cpu")
    left = list(families)
    for x_dtype in _PROBE_DTYPES:
        for w_dtype in ((torch.float32, torch.bfloat16) if weight is not None else (None,)):
            x = _probe_inputs(n, x_dtype, gen).to(device)
            if w_dtype is not None:
                w = torch.randn(n, generator=gen, dtype=torch.float64).mul(0.5).to(device=device, dtype=w_dtype)
                clone._parameters["weight"] = nn.Parameter(w, requires_grad=False)
            try:
                with torch.no_grad():
                    expect = type(clone).forward(clone, x)
                    outs = {f: replacement(clone, f, backend="reference")(x) for f in left}
            except Exception as exc:  # a forward that needs more than one tensor, or refuses
                return None, f"{name}: forward is not a known RMSNorm family (probing it raised {type(exc).__name__})"
            if not isinstance(expect, torch.Tensor):
                return None, f"{name}: forward is not a known RMSNorm family (it returns no tensor)"
            if expect.shape != x.shape:
                return None, (f"{name}: not a normalization of its input (shape {tuple(x.shape)} in, "
                              f"{tuple(expect.shape)} out: it returns a statistic, such as 1/RMS)")
            left = [f for f in left if outs[f].dtype == expect.dtype and outs[f].shape == expect.shape
                    and torch.equal(outs[f], expect)]
            if not left:
                return None, f"{name}: forward is not a known RMSNorm family (no family's numerics match it)"
    return left[0], "recognised by probing its forward"


def accelerate(model: nn.Module) -> SurgeryReport:
    """Replace, in place, every module that computes RMSNorm in a known way with rmsnorm.RMSNorm.

    The new modules reproduce each family's numerics (see the table in this module's docstring) and share
    the original parameters, so state_dicts and optimizers are unaffected. Modules that look like an
    RMSNorm (by name) but whose forward is not a known family are left and reported.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = SurgeryReport("accelerate RMSNorm modules")
    plan = []
    probed: dict[tuple[type, bool], tuple[str | None, str]] = {}  # one probe per class (and gain or none)
    for name, module in list(model.named_modules()):
        if isinstance(module, (RMSNorm, LastDimRMSNorm)):
            continue
        family = family_of(type(module))  # type: ignore[arg-type]  # a class is hashable
        how = ""
        if family is None:
            cls_name = type(module).__name__
            rms_named = re.search(r"RMSNorm|T5LayerNorm|L2Norm", cls_name) is not None
            # a norm named LayerNorm that is no nn.LayerNorm (CPM-Ant's is an RMSNorm): probed, and left
            # unreported unless it computes a family's numbers (most are LayerNorms, none of our business)
            if not rms_named and not (cls_name.endswith("LayerNorm") and not isinstance(module, nn.LayerNorm)):
                continue
            key = (type(module), getattr(module, "weight", None) is None)
            if key not in probed:
                probed[key] = probe_family(module)
            family, how = probed[key]
            if family is None:
                if rms_named:
                    report.skipped.append((name, how))
                continue
            how = f", {how}"
        try:
            new = replacement(module, family)
        except (ValueError, TypeError, AttributeError) as exc:
            report.skipped.append((name, f"{type(module).__name__}: {exc}"))
            continue
        if name == "":
            raise ValueError(f"model surgery replaces submodules in place and cannot replace the model itself "
                             f"({type(model).__name__}); pass the model that contains the norm")
        plan.append((name, module, new, family, how))
    with transaction(model):  # all replacements go in, or none
        for name, module, new, family, how in plan:
            hooks = move_hooks(module, new)
            set_submodule(model, name, new)
            moved = f", hooks moved: {', '.join(hooks)}" if hooks else ""
            report.changed.append((name, f"{type(module).__name__} -> {type(new).__name__} "
                                         f"({family} numerics{how}){moved}"))
    return report
