"""Exact Pre-LN -> Pre-RMSNorm conversion (Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers").

In a Pre-LN Transformer every LayerNorm reads the residual stream. If the stream has zero mean over the
hidden dimension, LN(h) = h / sqrt(mean(h^2) + eps) * g + b = RMSNorm(h) * g + b. The stream is made
zero-mean by centering everything that writes into it: the token and position embeddings, and the
output projections (weights and biases) of every attention and MLP sublayer. Each LayerNorm's gain and
bias are then folded into the linear layer that reads its output, leaving a plain RMSNorm. The converted
model computes the same function (in eval mode: dropout on a zero-mean vector does not keep it
zero-mean, so training-mode outputs differ as with any dropout mask).

Supported: Hugging Face GPT-2 models (GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification, ...)
and models of the same layout with nn.Linear layers (GPTBigCode). All or nothing: an error anywhere leaves
the model exactly as it was (:mod:`rmsnorm.surgery.transaction`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..module import RMSNorm
from .report import SurgeryReport, set_submodule
from .transaction import Transaction, move_hooks, transaction

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


def _center_rows_(tx: Transaction, weight: torch.Tensor) -> None:
    """Embedding rows (vocab, d): subtract each row's mean over d."""
    w = weight.double()
    tx.write(weight, w - w.mean(dim=-1, keepdim=True))


def _in_out(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (in, out): GPT-2's Conv1D stores it so, nn.Linear as (out, in)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().double().t()
    if type(layer).__name__ == "Conv1D" and layer.weight.dim() == 2:
        return layer.weight.detach().double()
    raise ExactConversionError(f"{type(layer).__name__} is neither nn.Linear nor GPT-2's Conv1D")


def _set_in_out(tx: Transaction, layer: nn.Module, w_in_out: torch.Tensor) -> None:
    tx.write(layer.weight, w_in_out.t() if isinstance(layer, nn.Linear) else w_in_out)


def _center_output_(tx: Transaction, layer: nn.Module) -> None:
    """A layer writing into the residual stream (y = x @ W + b, W as (in, out)): zero mean over out."""
    w = _in_out(layer)
    _set_in_out(tx, layer, w - w.mean(dim=1, keepdim=True))
    if layer.bias is not None:
        b = layer.bias.double()
        tx.write(layer.bias, b - b.mean())


def _fold_into_conv_(tx: Transaction, ln: nn.LayerNorm, layer: nn.Module) -> None:
    """layer(n * g + beta) = n @ (g[:, None] * W) + (beta @ W + c), W as (in, out)."""
    g = ln.weight.double() if ln.weight is not None else None
    beta = ln.bias.double() if ln.bias is not None else None
    w = _in_out(layer)
    if beta is not None:
        if layer.bias is None:
            raise ExactConversionError(f"{type(layer).__name__} after a LayerNorm with a bias has no bias to "
                                       "fold it into")
        tx.write(layer.bias, layer.bias.double() + beta @ w)
    if g is not None:
        _set_in_out(tx, layer, g[:, None] * w)


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
    """RMSNorm in ln's place: its gain and bias kept (``affine``), or none (they were folded elsewhere);
    ln's hooks move to it."""
    if affine:
        new = RMSNorm.from_layernorm(ln, keep_bias=True)
    else:
        new = RMSNorm(ln.normalized_shape, eps=ln.eps, elementwise_affine=False,
                      device=ln.weight.device if ln.weight is not None else None)
    new.train(ln.training)
    move_hooks(ln, new)
    return new


@torch.no_grad()
def convert_exact(model: nn.Module) -> SurgeryReport:
    """See the module docstring. All or nothing: on any error the model is restored and the error raised."""
    body, prefix = _gpt2_body(model)
    with transaction(model) as tx:
        return _convert_exact(model, body, prefix, tx)


def _convert_exact(model: nn.Module, body: nn.Module, prefix: str, tx: Transaction) -> SurgeryReport:
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
        _center_rows_(tx, getattr(body, name).weight)
        report.changed.append((prefix + name, "embedding rows centered (zero mean over the hidden size)"))
    for i, block in enumerate(body.h):
        p = f"{prefix}h.{i}."
        for ln_name, reader, writer in (("ln_1", "attn.c_attn", "attn.c_proj"), ("ln_2", "mlp.c_fc", "mlp.c_proj")):
            _center_output_(tx, block.get_submodule(writer))
            report.changed.append((p + writer, "output weights and bias centered"))
            ln = getattr(block, ln_name)
            _fold_into_conv_(tx, ln, block.get_submodule(reader))
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
        tx.setattr(config, "tie_word_embeddings", False)
    return report
