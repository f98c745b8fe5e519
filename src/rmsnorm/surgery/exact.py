"""Exact Pre-LN -> Pre-RMSNorm conversion (Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers").

In a Pre-LN Transformer every LayerNorm reads the residual stream. If the stream has zero mean over the
hidden dimension, LN(h) = h / sqrt(mean(h^2) + eps) * g + b = RMSNorm(h) * g + b. The stream is made
zero-mean by centering everything that writes into it: the token and position embeddings, and the
output projections (weights and biases) of every attention and MLP sublayer. Each LayerNorm's gain and
bias are then folded into the linear layer that reads its output, leaving a plain RMSNorm. The converted
model computes the same function (in eval mode: dropout on a zero-mean vector does not keep it
zero-mean, so training-mode outputs differ as with any dropout mask).

Supported (:data:`LAYOUTS`): Hugging Face GPT-2 (GPT2Model and its heads), GPTBigCode, GPT-Neo, GPT-J and
CodeGen (parallel attention and MLP), pre-LN OPT, GPT-NeoX / Pythia, Phi-1/2, Falcon (each block form) and
StableLM (sequential or parallel); anything else is refused before any change, with the reason for each
family. (BLOOM's LayerNorm on the embeddings writes LN(e) * g + b into the stream, which no centering of
weights makes zero-mean: refused.) All or nothing: an error anywhere leaves the model exactly as it was
(:mod:`rmsnorm.surgery.transaction`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..module import RMSNorm
from .report import SurgeryReport, set_submodule
from .transaction import Transaction, move_hooks, transaction

_HEADS = ("lm_head", "score")


class ExactConversionError(ValueError):
    """The model is not one this exact transformation is known to be exact for."""


@dataclass(frozen=True)
class Layout:
    """Where a Pre-LN family keeps what the conversion touches (paths relative to the body / a block)."""

    family: str
    body: str  # the body's path in the model ("" for the model itself)
    embeddings: tuple[str, ...]  # embeddings that write into the residual stream
    blocks: str  # the ModuleList of blocks
    sublayers: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]  # (norm, readers, writers) per block
    final: str  # the final norm
    no: tuple[str, ...] = ()  # block submodules that break the algebra (cross-attention reads another stream)


_GPT2_SUB = (("ln_1", ("attn.c_attn",), ("attn.c_proj",)), ("ln_2", ("mlp.c_fc",), ("mlp.c_proj",)))
LAYOUTS = (
    # GPT-2 (Conv1D layers) and GPTBigCode (nn.Linear, multi-query c_attn)
    Layout("GPT-2 / GPTBigCode", "transformer", ("wte", "wpe"), "h", _GPT2_SUB, "ln_f",
           no=("crossattention", "ln_cross_attn")),
    Layout("GPT-Neo", "transformer", ("wte", "wpe"), "h",
           (("ln_1", ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"),
             ("attn.attention.out_proj",)), ("ln_2", ("mlp.c_fc",), ("mlp.c_proj",))), "ln_f"),
    # GPT-J: attention and MLP in parallel, both reading ln_1, both writing into the stream (rotary: no wpe)
    Layout("GPT-J", "transformer", ("wte",), "h",
           (("ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"), ("attn.out_proj", "mlp.fc_out")),),
           "ln_f"),
    Layout("OPT (pre-LN)", "model.decoder", ("embed_tokens", "embed_positions"), "layers",
           (("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             ("self_attn.out_proj",)), ("final_layer_norm", ("fc1",), ("fc2",))), "final_layer_norm"),
    # CodeGen: GPT-J's parallel block with a fused qkv projection
    Layout("CodeGen", "transformer", ("wte",), "h",
           (("ln_1", ("attn.qkv_proj", "mlp.fc_in"), ("attn.out_proj", "mlp.fc_out")),), "ln_f"),
    # GPT-NeoX / Pythia: two norms reading the stream, in parallel (use_parallel_residual) or in sequence
    Layout("GPT-NeoX", "gpt_neox", ("embed_in",), "layers",
           (("input_layernorm", ("attention.query_key_value",), ("attention.dense",)),
            ("post_attention_layernorm", ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))), "final_layer_norm"),
    # Phi-1 / Phi-2: one norm read by attention and MLP in parallel
    Layout("Phi", "model", ("embed_tokens",), "layers",
           (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"),
             ("self_attn.dense", "mlp.fc2")),), "final_layernorm"),
    # Falcon: parallel attention with one norm, the new decoder's two norms, or sequential blocks
    Layout("Falcon (parallel, one norm)", "transformer", ("word_embeddings",), "h",
           (("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h"),
             ("self_attention.dense", "mlp.dense_4h_to_h")),), "ln_f", no=("ln_attn", "post_attention_layernorm")),
    Layout("Falcon (parallel, two norms)", "transformer", ("word_embeddings",), "h",
           (("ln_attn", ("self_attention.query_key_value",), ("self_attention.dense",)),
            ("ln_mlp", ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))), "ln_f"),
    Layout("Falcon (sequential)", "transformer", ("word_embeddings",), "h",
           (("input_layernorm", ("self_attention.query_key_value",), ("self_attention.dense",)),
            ("post_attention_layernorm", ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))), "ln_f"),
    # StableLM: sequential blocks, or attention and MLP in parallel reading one norm
    Layout("StableLM", "model", ("embed_tokens",), "layers",
           (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",)),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))), "norm"),
    Layout("StableLM (parallel)", "model", ("embed_tokens",), "layers",
           (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                                 "mlp.up_proj"), ("self_attn.o_proj", "mlp.down_proj")),), "norm",
           no=("post_attention_layernorm",)),
)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _body(model: nn.Module, lay: Layout) -> tuple[nn.Module, str] | None:
    """(body, its name prefix) in ``model``: the layout's body path, or the model itself when it is the bare
    body (GPT2Model, ...); None when neither."""
    body = _get(model, lay.body)
    if body is not None:
        return body, lay.body + "." if lay.body else ""
    if all(_get(model, e) is not None for e in lay.embeddings):
        return model, ""
    return None


def _mismatch(model: nn.Module, lay: Layout) -> str | None:
    """Why ``model`` does not have this layout (None: it has)."""
    if getattr(getattr(model, "config", None), "do_layer_norm_before", True) is False:
        return "it is post-LN (do_layer_norm_before=False): its norms read the sublayer outputs"
    found = _body(model, lay)
    if found is None:
        return f"no {lay.body}"
    body = found[0]
    for path in (*lay.embeddings, lay.blocks, lay.final):
        if _get(body, path) is None:
            return f"no {path}"
    for path in lay.embeddings:
        if not isinstance(_get(body, path), nn.Embedding):
            return f"{path} is not an nn.Embedding"
    blocks = _get(body, lay.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return f"{lay.blocks} is not a list of blocks"
    norms = [_get(body, lay.final)]
    for i, block in enumerate(blocks):
        for bad in lay.no:
            if _get(block, bad) is not None:
                return (f"block {i} has {bad}, which this layout does not (a norm reading another stream, or "
                        "another block structure)")
        for norm, readers, writers in lay.sublayers:
            norms.append(_get(block, norm))
            for path in (*readers, *writers):
                layer = _get(block, path)
                if not (isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D"):
                    return f"block {i} has no linear layer {path}"
    for ln in norms:
        if not isinstance(ln, nn.LayerNorm) or type(ln).forward is not nn.LayerNorm.forward:
            return f"a norm is {type(ln).__name__}, not a plain nn.LayerNorm"
    # every other LayerNorm of the body must read what a sublayer computes, not the stream or what enters it
    # (BLOOM normalizes the embeddings before they enter the stream: its stream is not centered by this)
    converted = {id(ln) for ln in norms}
    inner = {path.split(".")[0] for _, readers, _ in lay.sublayers for path in readers}  # attn, mlp, ...
    prefix = lay.blocks + "."
    for path, module in body.named_modules():
        if isinstance(module, nn.LayerNorm) and id(module) not in converted:
            rest = path[len(prefix):].split(".") if path.startswith(prefix) else []
            if not (len(rest) >= 3 and rest[1] in inner):  # inside a block's attention or MLP: reads its own
                return f"{path} is a LayerNorm outside the blocks' sublayers (it would read an uncentered stream)"
    decoder = _get(model, "model.decoder")
    if decoder is not None and any(_get(decoder, p) is not None for p in ("project_in", "project_out")):
        return "it projects the embeddings in and out of the stream"
    return None


def find_layout(model: nn.Module) -> tuple[Layout, nn.Module, str]:
    """(layout, body, body prefix) of a supported Pre-LN model; ExactConversionError with every reason else."""
    reasons = []
    for lay in LAYOUTS:
        why = _mismatch(model, lay)
        found = _body(model, lay)
        if why is None and found is not None:
            return lay, *found
        reasons.append(f"{lay.family}: {why}")
    raise ExactConversionError(
        f"exact conversion supports Pre-LN models of the families {', '.join(x.family for x in LAYOUTS)}; "
        f"{type(model).__name__} is none of them ({'; '.join(reasons)}). It cannot be exact unless every writer "
        f"into the residual stream can be centered; use convert(model) (not exact) and fine-tune instead")


def _layernorm(m: nn.Module) -> nn.LayerNorm:
    if not isinstance(m, nn.LayerNorm):
        raise ExactConversionError(f"expected a LayerNorm, found {type(m).__name__}")
    return m


def _center_rows_(tx: Transaction, weight: torch.Tensor) -> None:
    """Embedding rows (vocab, d): subtract each row's mean over d."""
    w = weight.double()
    tx.write(weight, w - w.mean(dim=-1, keepdim=True))


def _tensor(layer: nn.Module, name: str) -> torch.Tensor | None:
    """A parameter of ``layer`` (None when absent), typed as a tensor."""
    t = getattr(layer, name, None)
    if t is not None and not isinstance(t, torch.Tensor):
        raise ExactConversionError(f"{type(layer).__name__}.{name} is not a tensor")
    return t


def _weight(layer: nn.Module) -> torch.Tensor:
    w = _tensor(layer, "weight")
    if w is None:
        raise ExactConversionError(f"{type(layer).__name__} has no weight")
    return w


def _in_out(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (in, out): GPT-2's Conv1D stores it so, nn.Linear as (out, in)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().double().t()
    if type(layer).__name__ == "Conv1D" and _weight(layer).dim() == 2:
        return _weight(layer).detach().double()
    raise ExactConversionError(f"{type(layer).__name__} is neither nn.Linear nor GPT-2's Conv1D")


def _set_in_out(tx: Transaction, layer: nn.Module, w_in_out: torch.Tensor) -> None:
    tx.write(_weight(layer), w_in_out.t() if isinstance(layer, nn.Linear) else w_in_out)


def _center_output_(tx: Transaction, layer: nn.Module) -> None:
    """A layer writing into the residual stream (y = x @ W + b, W as (in, out)): zero mean over out."""
    w = _in_out(layer)
    _set_in_out(tx, layer, w - w.mean(dim=1, keepdim=True))
    bias = _tensor(layer, "bias")
    if bias is not None:
        b = bias.double()
        tx.write(bias, b - b.mean())


def _fold_into_conv_(tx: Transaction, ln: nn.LayerNorm, layer: nn.Module) -> None:
    """layer(n * g + beta) = n @ (g[:, None] * W) + (beta @ W + c), W as (in, out). A layer without a bias
    gets one (a zero bias added beforehand, see _with_bias) when beta is nonzero."""
    g = ln.weight.double() if ln.weight is not None else None
    beta = ln.bias.double() if ln.bias is not None else None
    w = _in_out(layer)
    if beta is not None:
        bias = _tensor(layer, "bias")
        if bias is None:
            raise ExactConversionError(f"{type(layer).__name__} after a LayerNorm with a bias has no bias to "
                                       "fold it into")
        tx.write(bias, bias.double() + beta @ w)
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


def _with_bias(model: nn.Module, path: str, layer: nn.Module) -> nn.Module:
    """An nn.Linear without a bias gets a zero one (same weight Parameter), so a LayerNorm bias can be
    folded into it; other layers are returned as they are."""
    if not isinstance(layer, nn.Linear) or layer.bias is not None:
        return layer
    new = nn.Linear(layer.in_features, layer.out_features, bias=True, device=layer.weight.device,
                    dtype=layer.weight.dtype)
    new.weight = layer.weight
    new.bias.data.zero_()
    new.train(layer.training)
    move_hooks(layer, new)
    set_submodule(model, path, new)
    return new


@torch.no_grad()
def convert_exact(model: nn.Module) -> SurgeryReport:
    """See the module docstring. All or nothing: on any error the model is restored and the error raised."""
    layout, body, prefix = find_layout(model)
    with transaction(model) as tx:
        return _convert_exact(model, layout, body, prefix, tx)


def _convert_exact(model: nn.Module, layout: Layout, body: nn.Module, prefix: str, tx: Transaction
                   ) -> SurgeryReport:
    report = SurgeryReport(f"exact Pre-LN -> Pre-RMSNorm ({layout.family}; zero-mean residual stream)")
    head_name = next((h for h in _HEADS if isinstance(getattr(model, h, None), nn.Linear)), None)
    token_embedding = body.get_submodule(layout.embeddings[0])
    if head_name is not None and getattr(model, head_name).weight is token_embedding.weight:
        head = getattr(model, head_name)  # tied: keep the uncentered embedding for the output layer
        untied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                           device=head.weight.device, dtype=head.weight.dtype)
        untied.weight.copy_(head.weight)
        if head.bias is not None:
            untied.bias.copy_(head.bias)
        set_submodule(model, head_name, untied)
        report.changed.append((head_name, "untied from the token embedding"))
    for name in layout.embeddings:
        _center_rows_(tx, _weight(body.get_submodule(name)))
        report.changed.append((prefix + name, "embedding rows centered (zero mean over the hidden size)"))
    blocks = body.get_submodule(layout.blocks)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ExactConversionError(f"{layout.blocks} is not a list of blocks")
    for i, block in enumerate(blocks):
        p = f"{prefix}{layout.blocks}.{i}."
        for ln_name, readers, writers in layout.sublayers:
            for writer in writers:
                _center_output_(tx, block.get_submodule(writer))
                report.changed.append((p + writer, "output weights and bias centered"))
            ln = _layernorm(block.get_submodule(ln_name))
            for reader in readers:
                layer = block.get_submodule(reader)
                if ln.bias is not None:
                    layer = _with_bias(block, reader, layer)
                _fold_into_conv_(tx, ln, layer)
                report.changed.append((p + reader, f"{ln_name} gain and bias folded in"))
            set_submodule(block, ln_name, _plain_rmsnorm(ln, affine=False))
            report.changed.append((p + ln_name, "LayerNorm -> RMSNorm (no affine)"))
    final = _layernorm(body.get_submodule(layout.final))
    if head_name is not None:
        head = getattr(model, head_name)
        set_submodule(model, head_name, _fold_into_linear(final, head))
        report.changed.append((head_name, f"{layout.final} gain and bias folded in (own weight and bias)"))
        set_submodule(body, layout.final, _plain_rmsnorm(final, affine=False))
        report.changed.append((prefix + layout.final, "LayerNorm -> RMSNorm (no affine)"))
    else:
        set_submodule(body, layout.final, _plain_rmsnorm(final, affine=True))
        report.changed.append((prefix + layout.final,
                               "LayerNorm -> RMSNorm (gain and bias kept: no layer to fold into)"))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        tx.setattr(config, "tie_word_embeddings", False)
    return report
