"""The models of the reproduction, each with its normalization variant.

- ``GRUSeq2Seq``: RNNSearch-style GRU encoder-decoder with additive attention (Bahdanau et al.); as in the
  authors' Theano RMS GRU, four norms per cell (:class:`NormGRUCell`).
- ``TransformerMT``: post-norm Transformer encoder-decoder (the paper's base model, scaled down).
- ``ConvPoolCNNC``: ConvPool-CNN-C (Springenberg et al.), narrower, with a norm after every convolution.
- ``GRURetrieval``: two GRU sentence encoders into one embedding space (the text side of the paper's
  order-embedding caption retrieval), for English-Spanish verse retrieval.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .norms import Norm, SpatialNorm

PAD, BOS, EOS = 0, 1, 2


class NormGRUCell(nn.Module):
    """GRU cell with four norms, as the authors' RMS GRU (Theano): W x for the gates [r, z], W x for the
    candidate, U h for [r, z], U h for the candidate, each normalized on its own (gain, no norm bias; the gate
    biases are W's). r, z = sigmoid(N(W_rz x) + N(U_rz h)); c = tanh(N(W_c x) + r * N(U_c h)). W x is computed
    for the whole sequence at once. Initialisation as theirs: W ~ N(0, 0.01), U orthogonal, biases zero."""

    def __init__(self, in_dim: int, hidden: int, variant: str, backend: str | None) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_rz, self.w_c = nn.Linear(in_dim, 2 * hidden), nn.Linear(in_dim, hidden)
        self.u_rz, self.u_c = nn.Linear(hidden, 2 * hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
        self.n_wrz = Norm(variant, 2 * hidden, backend, bias=False)
        self.n_wc = Norm(variant, hidden, backend, bias=False)
        self.n_urz = Norm(variant, 2 * hidden, backend, bias=False)
        self.n_uc = Norm(variant, hidden, backend, bias=False)
        with torch.no_grad():
            for w in (self.w_rz, self.w_c):
                nn.init.normal_(w.weight, std=0.01)
                nn.init.zeros_(w.bias)
            for u in (self.u_rz.weight[:hidden], self.u_rz.weight[hidden:], self.u_c.weight):
                nn.init.orthogonal_(u)

    def input_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.n_wrz(self.w_rz(x)), self.n_wc(self.w_c(x))

    def step(self, gx: tuple[torch.Tensor, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        rz = torch.sigmoid(gx[0] + self.n_urz(self.u_rz(h)))
        r, z = rz[..., : self.hidden], rz[..., self.hidden:]
        c = torch.tanh(gx[1] + r * self.n_uc(self.u_c(h)))
        return (1 - z) * c + z * h


def run_gru(cell: NormGRUCell, x: torch.Tensor, mask: torch.Tensor, reverse: bool = False):
    """Run ``cell`` over x (B, S, in) where mask (B, S) is True; padded steps keep the state.
    Returns the states (B, S, H) and the final state (B, H)."""
    gates = cell.input_gates(x)
    b, s = mask.shape
    h = x.new_zeros(b, cell.hidden)
    states: list[Any] = [None] * s
    for t in (reversed(range(s)) if reverse else range(s)):
        h = torch.where(mask[:, t, None], cell.step((gates[0][:, t], gates[1][:, t]), h), h)
        states[t] = h
    return torch.stack(states, 1), h


class GRUSeq2Seq(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int, variant: str, backend: str | None = None) -> None:
        super().__init__()
        self.hidden = hidden
        self.src_emb = nn.Embedding(vocab, emb, padding_idx=PAD)
        self.tgt_emb = nn.Embedding(vocab, emb, padding_idx=PAD)
        self.enc_f = NormGRUCell(emb, hidden, variant, backend)
        self.enc_b = NormGRUCell(emb, hidden, variant, backend)
        self.init = nn.Linear(2 * hidden, hidden)
        self.dec = NormGRUCell(emb + 2 * hidden, hidden, variant, backend)
        self.att_k = nn.Linear(2 * hidden, hidden, bias=False)
        self.att_q = nn.Linear(hidden, hidden)
        self.att_v = nn.Linear(hidden, 1, bias=False)
        self.out = nn.Linear(hidden + 2 * hidden + emb, emb)
        self.proj = nn.Linear(emb, vocab)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = src != PAD  # (B, S)
        e = self.src_emb(src)
        fw, _ = run_gru(self.enc_f, e, mask)
        bw, _ = run_gru(self.enc_b, e, mask, reverse=True)
        ctx = torch.cat([fw, bw], dim=-1)  # (B, S, 2H)
        mean = (ctx * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return ctx, mask, torch.tanh(self.init(mean))

    def _attend(self, keys, ctx, mask, s):
        scores = self.att_v(torch.tanh(keys + self.att_q(s)[:, None])).squeeze(-1)
        a = torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1)
        return torch.bmm(a[:, None], ctx).squeeze(1)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        ctx, mask, s = self.encode(src)
        keys = self.att_k(ctx)
        y = self.tgt_emb(tgt_in)
        c = ctx.new_zeros(ctx.shape[0], ctx.shape[-1])
        outs = []
        for t in range(tgt_in.shape[1]):
            gx = self.dec.input_gates(torch.cat([y[:, t], c], -1))
            s = self.dec.step(gx, s)
            c = self._attend(keys, ctx, mask, s)
            outs.append(torch.tanh(self.out(torch.cat([s, c, y[:, t]], -1))))
        return self.proj(torch.stack(outs, 1))

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int) -> torch.Tensor:
        ctx, mask, s = self.encode(src)
        keys = self.att_k(ctx)
        b = src.shape[0]
        tok = torch.full((b,), BOS, dtype=torch.long, device=src.device)
        c = ctx.new_zeros(b, ctx.shape[-1])
        out = []
        for _ in range(max_len):
            y = self.tgt_emb(tok)
            s = self.dec.step(self.dec.input_gates(torch.cat([y, c], -1)), s)
            c = self._attend(keys, ctx, mask, s)
            tok = self.proj(torch.tanh(self.out(torch.cat([s, c, y], -1)))).argmax(-1)
            out.append(tok)
        return torch.stack(out, 1)


class _Block(nn.Module):
    """Post-norm Transformer layer: x = N(x + SelfAttn(x)); [x = N(x + CrossAttn(x, mem))]; x = N(x + FFN(x))."""

    def __init__(self, d: int, heads: int, ffn: int, variant: str, backend: str | None, cross: bool,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True) if cross else None
        self.ff = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.n1 = Norm(variant, d, backend)
        self.n2 = Norm(variant, d, backend) if cross else None
        self.n3 = Norm(variant, d, backend)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, pad_mask, mem=None, mem_mask=None, causal=None):
        a = self.self_attn(x, x, x, key_padding_mask=pad_mask, attn_mask=causal, need_weights=False)[0]
        x = self.n1(self.drop(a), residual=x)
        if self.cross_attn is not None:
            a = self.cross_attn(x, mem, mem, key_padding_mask=mem_mask, need_weights=False)[0]
            x = self.n2(self.drop(a), residual=x)
        return self.n3(self.drop(self.ff(x)), residual=x)


class TransformerMT(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, ffn: int, layers: int, variant: str,
                 backend: str | None = None, dropout: float = 0.1, max_len: int = 256) -> None:
        super().__init__()
        self.d = d
        self.emb = nn.Embedding(vocab, d, padding_idx=PAD)
        pos = torch.arange(max_len)[:, None] * torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        pe = torch.zeros(max_len, d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos), torch.cos(pos)
        self.register_buffer("pe", pe, persistent=False)
        self.enc = nn.ModuleList(_Block(d, heads, ffn, variant, backend, False, dropout) for _ in range(layers))
        self.dec = nn.ModuleList(_Block(d, heads, ffn, variant, backend, True, dropout) for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.emb.weight, std=d ** -0.5)  # tied with the output layer, scaled by sqrt(d) on input
        with torch.no_grad():
            self.emb.weight[PAD].zero_()
        self.proj = nn.Linear(d, vocab)
        self.proj.weight = self.emb.weight

    def _embed(self, tok):
        return self.drop(self.emb(tok) * math.sqrt(self.d) + self.pe[: tok.shape[1]])

    def encode(self, src):
        mask = src == PAD
        x = self._embed(src)
        for blk in self.enc:
            x = blk(x, mask)
        return x, mask

    def decode(self, tgt_in, mem, mem_mask):
        t = tgt_in.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tgt_in.device), 1)
        x = self._embed(tgt_in)
        for blk in self.dec:
            x = blk(x, tgt_in == PAD, mem, mem_mask, causal)
        return self.proj(x)

    def forward(self, src, tgt_in):
        mem, mask = self.encode(src)
        return self.decode(tgt_in, mem, mask)

    @torch.no_grad()
    def greedy(self, src, max_len: int):
        mem, mask = self.encode(src)
        tok = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)
        for _ in range(max_len):
            nxt = self.decode(tok, mem, mask)[:, -1].argmax(-1, keepdim=True)
            tok = torch.cat([tok, nxt], 1)
        return tok[:, 1:]


class ConvPoolCNNC(nn.Module):
    """ConvPool-CNN-C: 3 convs (c1) - maxpool - 3 convs (c2) - maxpool - conv3x3, conv1x1 (c2) - conv1x1 to
    the classes - global average pooling; a norm (then ReLU) after every convolution but the last."""

    def __init__(self, c1: int, c2: int, variant: str, backend: str | None = None, classes: int = 10,
                 in_ch: int = 1, dropout: float = 0.3) -> None:
        super().__init__()
        spec: list[tuple[int, int, int] | str] = [(in_ch, c1, 3), (c1, c1, 3), (c1, c1, 3), "pool", (c1, c2, 3),
                                                  (c2, c2, 3), (c2, c2, 3), "pool", (c2, c2, 3), (c2, c2, 1)]
        layers: list[nn.Module] = []
        for s in spec:
            if isinstance(s, str):
                layers += [nn.MaxPool2d(3, 2, padding=1), nn.Dropout(dropout)]
            else:
                cin, cout, k = s
                # bias-free before a norm (the authors' Lasagne code): LayerNorm would cancel a conv bias,
                # RMSNorm would not; the norm's own bias takes its place
                conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=variant == "baseline")
                layers += [conv, SpatialNorm(variant, cout, backend), nn.ReLU()]
        layers.append(nn.Conv2d(c2, classes, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.net(x), 1).flatten(1)


class MLP(nn.Module):
    """Flattened image -> ``layers`` x (Linear, norm, ReLU, dropout) -> Linear to the classes. The norm runs
    over the hidden units (rows of ``hidden``), gain and bias inside the norm call; the linear layers before
    a norm have no bias (the norm's bias takes its place)."""

    def __init__(self, inputs: int, hidden: int, layers: int, classes: int, variant: str,
                 backend: str | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Flatten()]
        for i in range(layers):
            blocks += [nn.Linear(inputs if i == 0 else hidden, hidden, bias=variant == "baseline"),
                       Norm(variant, hidden, backend), nn.ReLU(), nn.Dropout(dropout)]
        blocks.append(nn.Linear(hidden, classes))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GRURetrieval(nn.Module):
    """One GRU encoder per language (the norm on the gate pre-activations, as in ``GRUSeq2Seq``); a
    sentence is the final GRU state, projected to ``dim`` and L2-normalized, so a pair scores its cosine
    (the order-embedding paper's text encoder, with a cosine score: translation is symmetric)."""

    def __init__(self, vocab: int, emb: int, hidden: int, dim: int, variant: str, backend: str | None = None):
        super().__init__()
        self.emb = nn.ModuleList(nn.Embedding(vocab, emb, padding_idx=PAD) for _ in range(2))
        self.gru = nn.ModuleList(NormGRUCell(emb, hidden, variant, backend) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(2))

    def embed(self, tok: torch.Tensor, side: int) -> torch.Tensor:
        cell = self.gru[side]
        assert isinstance(cell, NormGRUCell)
        _, h = run_gru(cell, self.emb[side](tok), tok != PAD)
        return F.normalize(self.proj[side](h), dim=-1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(a, 0), self.embed(b, 1)
