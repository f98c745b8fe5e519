"""Exact Pre-LN -> Pre-RMSNorm conversion (Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers").

In a Pre-LN Transformer every LayerNorm reads the residual stream. If the stream has zero mean over the
hidden dimension, LN(h) = h / sqrt(mean(h^2) + eps) * g + b = RMSNorm(h) * g + b. The stream is made
zero-mean by centering everything that writes into it: the token and position embeddings, and the
output projections (weights and biases) of every attention and MLP sublayer. Each LayerNorm's gain and
bias are then folded into the linear layer that reads its output, leaving a plain RMSNorm. The converted
model computes the same function (in eval mode: dropout on a zero-mean vector does not keep it
zero-mean, so training-mode outputs differ as with any dropout mask).

Supported: Hugging Face GPT-2 models (GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from ..module import RMSNorm
from .report import SurgeryReport, set_submodule

_HEADS = ("lm_head", "score")


class ExactConversionError(ValueError):
    """The model is not one this exact transformation is known to be exact for."""


def _gpt2_body(model: nn.Module) -> tuple[nn.Module, str]:
    body, prefix = (model.transformer, "transformer.") if hasattr(model, "transformer") else (model, "")
    name = type(model).__name__
    needed = ("wte", "wpe", "h", "ln_f")
    missing = [a for a in needed if not hasattr(body, a)]
    if missing:
        raise ExactConversionError(
            f"exact conversion supports GPT-2-style Pre-LN models (Hugging Face GPT2Model and its heads); "
            f"{name} is not one: it has no {', '.join(missing)}. For other architectures it cannot be exact "
            f"unless every writer into the residual stream can be centered; use convert(model) (not exact) "
            f"and fine-tune instead")
    for i, block in enumerate(body.h):
        for path in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            try:
                block.get_submodule(path)
            except AttributeError:
                raise ExactConversionError(f"{name}: block {i} has no {path}; not a GPT-2 block") from None
        if hasattr(block, "crossattention") or hasattr(block, "ln_cross_attn"):
            raise ExactConversionError(f"{name}: block {i} has cross-attention, whose LayerNorm reads a stream "
                                       "this conversion does not center")
        for ln in (block.ln_1, block.ln_2):
            if not isinstance(ln, nn.LayerNorm):
                raise ExactConversionError(f"{name}: block {i} norm is {type(ln).__name__}, not nn.LayerNorm")
    if not isinstance(body.ln_f, nn.LayerNorm):
        raise ExactConversionError(f"{name}: final norm is {type(body.ln_f).__name__}, not nn.LayerNorm")
    return body, prefix


def _center_rows_(weight: torch.Tensor) -> None:
    """Embedding rows (vocab, d): subtract each row's mean over d."""
    w = weight.double()
    weight.copy_(w - w.mean(dim=-1, keepdim=True))


def _center_output_(conv: nn.Module) -> None:
    """A GPT-2 Conv1D (y = x @ W + b, W of shape (in, out)) whose output must have zero mean over out."""
    w = conv.weight.double()
    conv.weight.copy_(w - w.mean(dim=1, keepdim=True))
    if conv.bias is not None:
        b = conv.bias.double()
        conv.bias.copy_(b - b.mean())


def _fold_into_conv_(ln: nn.LayerNorm, conv: nn.Module) -> None:
    """conv(n * g + beta) = n @ (g[:, None] * W) + (beta @ W + c)."""
    g = ln.weight.double() if ln.weight is not None else None
    beta = ln.bias.double() if ln.bias is not None else None
    w = conv.weight.double()
    if beta is not None:
        c = conv.bias.double() if conv.bias is not None else torch.zeros(w.shape[1], dtype=torch.float64)
        conv.bias.copy_(c + beta @ w)
    if g is not None:
        conv.weight.copy_(g[:, None] * w)


def _fold_into_linear(ln: nn.LayerNorm, lin: nn.Linear) -> nn.Linear:
    """A new Linear equal to lin(n * g + beta): weight W * g, bias b + W @ beta (own parameters: untied)."""
    w = lin.weight.detach().double()
    out = nn.Linear(lin.in_features, lin.out_features, bias=True, device=lin.weight.device, dtype=lin.weight.dtype)
    bias = lin.bias.detach().double() if lin.bias is not None else torch.zeros(lin.out_features, dtype=torch.float64)
    if ln.bias is not None:
        bias = bias + w @ ln.bias.double()
    if ln.weight is not None:
        w = w * ln.weight.double()[None, :]
    out.weight.copy_(w)
    out.bias.copy_(bias)
    return out


def _plain_rmsnorm(ln: nn.LayerNorm, affine: bool) -> RMSNorm:
    """RMSNorm in ln's place: its gain and bias kept (``affine``), or none (they were folded elsewhere)."""
    if affine:
        new = RMSNorm.from_layernorm(ln, keep_bias=True)
    else:
        new = RMSNorm(ln.normalized_shape, eps=ln.eps, elementwise_affine=False)
    new.train(ln.training)
    return new


@torch.no_grad()
def convert_exact(model: nn.Module) -> SurgeryReport:
    body, prefix = _gpt2_body(model)
    report = SurgeryReport("exact Pre-LN -> Pre-RMSNorm (zero-mean residual stream)")
    head_name = next((h for h in _HEADS if isinstance(getattr(model, h, None), nn.Linear)), None)
    if head_name is not None and getattr(model, head_name).weight is body.wte.weight:
        head = getattr(model, head_name)  # tied: keep the uncentered embedding for the output layer
        untied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                           device=head.weight.device, dtype=head.weight.dtype)
        untied.weight.copy_(head.weight)
        if head.bias is not None:
            untied.bias.copy_(head.bias)
        set_submodule(model, head_name, untied)
        report.changed.append((head_name, "untied from the token embedding"))
    for name in ("wte", "wpe"):
        _center_rows_(getattr(body, name).weight)
        report.changed.append((prefix + name, "embedding rows centered (zero mean over the hidden size)"))
    for i, block in enumerate(body.h):
        p = f"{prefix}h.{i}."
        for ln_name, reader, writer in (("ln_1", "attn.c_attn", "attn.c_proj"), ("ln_2", "mlp.c_fc", "mlp.c_proj")):
            _center_output_(block.get_submodule(writer))
            report.changed.append((p + writer, "output weights and bias centered"))
            ln = getattr(block, ln_name)
            _fold_into_conv_(ln, block.get_submodule(reader))
            report.changed.append((p + reader, f"{ln_name} gain and bias folded in"))
            setattr(block, ln_name, _plain_rmsnorm(ln, affine=False))
            report.changed.append((p + ln_name, "LayerNorm -> RMSNorm (no affine)"))
    if head_name is not None:
        head = getattr(model, head_name)
        set_submodule(model, head_name, _fold_into_linear(body.ln_f, head))
        report.changed.append((head_name, "ln_f gain and bias folded in (own weight and bias)"))
        body.ln_f = _plain_rmsnorm(body.ln_f, affine=False)
        report.changed.append((prefix + "ln_f", "LayerNorm -> RMSNorm (no affine)"))
    else:
        body.ln_f = _plain_rmsnorm(body.ln_f, affine=True)
        report.changed.append((prefix + "ln_f", "LayerNorm -> RMSNorm (gain and bias kept: no layer to fold into)"))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    return report
