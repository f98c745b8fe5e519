"""Tasks: data, deterministic batches, model, loss and evaluation for each experiment of the paper."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from . import data as D
from .atomic import atomic_file
from .models import BOS, EOS, MLP, PAD, ConvPoolCNNC, GRURetrieval, GRUSeq2Seq, TransformerMT
from .presets import CNNSize, GRUMTSize, MLPSize, MTSize, RetrievalSize, Schedule, TransformerMTSize

if TYPE_CHECKING:
    import numpy as np  # the experiments extra; imported where it is used


class Task(Protocol):
    """One experiment: its data, deterministic batches, model, loss and evaluation. ``metric`` names the
    headline quality in what :meth:`evaluate` returns; ``evaluate(model, "dev")`` scores the dev split
    (learning-rate choice), ``"test"`` the held-out test split (the reported numbers). ``dev_loss`` is the
    training loss on fixed dev batches without dropout: logged during training, it tells whether a run has
    converged (a training loss can keep falling by memorizing)."""

    name: str
    metric: str
    size: Schedule

    def build(self, variant: str, backend: str | None) -> torch.nn.Module: ...

    def batch(self, seed: int, step: int, rank: int = 0, world: int = 1) -> tuple: ...

    def loss(self, model: Any, batch: tuple) -> torch.Tensor: ...

    def evaluate(self, model: Any, split: str = "test") -> dict: ...

    def dev_loss(self, model: Any) -> float: ...

    def trivial_baseline(self) -> dict: ...


TASKS = ("mt-gru", "mt-transformer", "image", "image-mlp", "retrieval")  # the registry below, in report order
TASK_TITLES = {
    "mt-gru": "MT En→Es, GRU encoder-decoder with attention (RNNSearch)",
    "mt-transformer": "MT En→Es, post-norm Transformer",
    "image": "Fashion-MNIST, ConvPool-CNN-C",
    "image-mlp": "Fashion-MNIST, MLP (a norm after each hidden layer)",
    "retrieval": "Verse retrieval En→Es, GRU sentence encoders (order-embedding style)",
}
EVAL_SEED = 1234  # the random held-out evaluation subsets


def check_tasks(names: list[str]) -> list[str]:
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}")
    return names


def _epoch_index(n: int, seed: int, epoch: int) -> np.ndarray:
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n)


def _slice(n: int, batch: int, seed: int, step: int, rank: int, world: int) -> np.ndarray:
    """Example indices of this rank's share of global batch ``step`` (a fixed function of the step, so a
    resumed run sees the same data)."""
    per_epoch = max(1, n // (batch * world))
    epoch, within = divmod(step, per_epoch)
    idx = _epoch_index(n, seed, epoch)
    start = (within * world + rank) * batch
    return idx[start:start + batch]


# -------------------------------------------------------------------------------------------- translation

def train_tokenizer(texts: list[str], vocab: int, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    atomic_file(path, lambda tmp: tok.save(str(tmp)))
    return tok


@dataclass
class Held:
    """An evaluation split: token ids of the sources, reference texts, source texts."""

    src: list[list[int]]
    ref: list[str]
    src_text: list[str]


@dataclass
class MTData:
    tok: Any
    vocab: int
    train_src: list[list[int]]
    train_tgt: list[list[int]]
    held: dict[str, Held]  # "dev", "test"


def _subset(n: int, k: int) -> list[int]:
    """A random subset of k of n examples (fixed seed), in index order: not the first k in canonical order."""
    if k >= n:
        return list(range(n))
    import numpy as np

    return sorted(np.random.default_rng(EVAL_SEED).choice(n, size=k, replace=False).tolist())


def held_out_loss(task: Any, model: Any, batches: list[tuple]) -> float:
    """Mean of ``task.loss`` over ``batches`` in eval mode (no dropout), on the model's device."""
    dev = _device(model)
    model.eval()
    with torch.no_grad():
        total = sum(task.loss(model, tuple(t.to(dev) for t in b)).item() for b in batches)
    model.train()
    return total / max(len(batches), 1)


def _device(model) -> torch.device:
    """Where the model's parameters are: evaluation batches go there (CPU-built tensors otherwise)."""
    p = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


class Translation:
    """Verse translation. Pairs with a side longer than ``max_len`` BPE tokens are left out of training and
    evaluation (nothing is truncated, so no target teaches the model to stop mid-verse); the dev and test
    sets are random subsets of ``eval_examples`` of the remaining held-out verses."""

    metric = "BLEU"
    dataset = "bible"

    def __init__(self, name: str, size: MTSize, which: str, work: Path) -> None:
        self.name, self.size = name, size
        corpus = D.load_bible(which)
        source = data_file(name, which).split(".tsv")[0]  # a tokenizer belongs to its training split
        tok = train_tokenizer(corpus["train"].src + corpus["train"].tgt, size.vocab,
                              work / f"bpe-{size.vocab}-{source}.json")
        limit = size.max_len - 1  # room for BOS / EOS

        def pairs(split: str) -> list[tuple[list[int], list[int], str, str]]:
            part = corpus[split]
            ids = zip(tok.encode_batch(part.src), tok.encode_batch(part.tgt))
            return [(a.ids, b.ids, s, t) for (a, b), s, t in zip(ids, part.src, part.tgt)
                    if len(a.ids) <= limit and len(b.ids) <= limit]

        train = pairs("train")
        held = {}
        for split in ("dev", "test"):
            kept = pairs(split)
            chosen = [kept[i] for i in _subset(len(kept), size.eval_examples)]
            held[split] = Held([c[0] for c in chosen], [c[3] for c in chosen], [c[2] for c in chosen])
        self.data = MTData(tok, tok.get_vocab_size(), [p[0] for p in train], [p[1] for p in train], held)
        self.held_tgt = {k: [e.ids for e in tok.encode_batch(h.ref)] for k, h in held.items()}
        self._dev_batches: list[tuple] | None = None

    def build(self, variant: str, backend: str | None):
        s = self.size
        if isinstance(s, GRUMTSize):
            return GRUSeq2Seq(self.data.vocab, s.emb, s.hidden, variant, backend)
        assert isinstance(s, TransformerMTSize)
        return TransformerMT(self.data.vocab, s.d_model, s.heads, s.ffn, s.layers, variant, backend,
                             dropout=s.dropout)

    @staticmethod
    def _pad(seqs: list[list[int]], bos: bool = False, eos: bool = False) -> torch.Tensor:
        seqs = [([BOS] if bos else []) + s + ([EOS] if eos else []) for s in seqs]
        out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out

    def batch(self, seed: int, step: int, rank: int = 0, world: int = 1):
        idx = _slice(len(self.data.train_src), self.size.batch, seed, step, rank, world)
        return self._pair_batch([self.data.train_src[i] for i in idx], [self.data.train_tgt[i] for i in idx])

    def _pair_batch(self, src: list[list[int]], tgt: list[list[int]]) -> tuple:
        return self._pad(src), self._pad(tgt, bos=True), self._pad(tgt, eos=True)

    def dev_loss(self, model) -> float:
        if self._dev_batches is None:
            n, b = min(self.size.dev_loss_examples, len(self.held_tgt["dev"])), self.size.batch
            self._dev_batches = [self._pair_batch(self.data.held["dev"].src[i:i + b], self.held_tgt["dev"][i:i + b])
                                 for i in range(0, n, b)]
        return held_out_loss(self, model, self._dev_batches)

    def loss(self, model, batch) -> torch.Tensor:
        src, tgt_in, tgt_out = batch
        logits = model(src, tgt_in)
        return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD,
                               label_smoothing=self.size.label_smoothing)

    def evaluate(self, model, split: str = "test") -> dict:
        import sacrebleu

        held = self.data.held[split]
        model.eval()
        hyps = []
        dev = _device(model)
        with torch.no_grad():
            for i in range(0, len(held.src), 64):
                src = self._pad(held.src[i:i + 64]).to(dev)
                out = model.greedy(src, max_len=min(self.size.max_len + 8, int(src.shape[1] * 1.5) + 8))
                for row in out.tolist():
                    row = row[: row.index(EOS)] if EOS in row else row
                    hyps.append(self.data.tok.decode([t for t in row if t > EOS]))
        model.train()
        bleu = sacrebleu.corpus_bleu(hyps, [held.ref])
        return {"BLEU": round(bleu.score, 2), "examples": len(hyps), "sample": hyps[:2]}

    def trivial_baseline(self) -> dict:
        import sacrebleu

        held = self.data.held["test"]
        return {"copy-source BLEU": round(sacrebleu.corpus_bleu(held.src_text, [held.ref]).score, 2)}


# -------------------------------------------------------------------------------------------- retrieval

class Retrieval(Translation):
    """Find a verse's translation among the held-out verses: the paper's caption retrieval (order
    embeddings, GRU text encoder) with the Spanish verse in place of the image. Trained with the hinge
    loss over in-batch negatives of order embeddings / VSE (margin 0.2, both directions)."""

    metric = "R@1"
    margin = 0.2

    def __init__(self, name: str, size: RetrievalSize, which: str, work: Path) -> None:
        super().__init__(name, size, which, work)
        self.size: RetrievalSize = size

    def build(self, variant: str, backend: str | None):
        s = self.size
        return GRURetrieval(self.data.vocab, s.emb, s.hidden, s.dim, variant, backend)

    def _pair_batch(self, src: list[list[int]], tgt: list[list[int]]) -> tuple:
        return self._pad(src, eos=True), self._pad(tgt, eos=True)

    def batch(self, seed: int, step: int, rank: int = 0, world: int = 1):
        idx = _slice(len(self.data.train_src), self.size.batch, seed, step, rank, world)
        return self._pair_batch([self.data.train_src[i] for i in idx], [self.data.train_tgt[i] for i in idx])

    def loss(self, model, batch) -> torch.Tensor:
        a, b = model(*batch)
        scores = a @ b.T
        pos = scores.diagonal()
        off = ~torch.eye(len(pos), dtype=torch.bool, device=scores.device)
        cost_b = (self.margin - pos[:, None] + scores).clamp_min(0) * off  # a's wrong translations
        cost_a = (self.margin - pos[None, :] + scores).clamp_min(0) * off  # b's wrong translations
        return (cost_a.sum() + cost_b.sum()) / len(pos)

    def evaluate(self, model, split: str = "test") -> dict:
        model.eval()
        dev = _device(model)
        with torch.no_grad():
            emb = [torch.cat([model.embed(self._pad(seqs[i:i + 250], eos=True).to(dev), side).float().cpu()
                              for i in range(0, len(seqs), 250)])
                   for side, seqs in ((0, self.data.held[split].src), (1, self.held_tgt[split]))]
        model.train()
        scores = emb[0] @ emb[1].T
        out = {}
        for name, s in (("Es→En ", scores.T), ("", scores)):
            rank = (s > s.diagonal()[:, None]).sum(1)  # 0 = the translation scores highest
            for k in (1, 5, 10):
                out[f"{name}R@{k}"] = round(100.0 * (rank < k).float().mean().item(), 2)
        return {**out, "median rank": int(rank.median().item()) + 1, "examples": len(rank)}  # En→Es

    def trivial_baseline(self) -> dict:
        return {"chance R@1": round(100.0 / len(self.held_tgt["test"]), 2)}


# ----------------------------------------------------------------------------------------------- images

class Images:
    """Fashion-MNIST with the ConvPool-CNN-C (``image``) or an MLP (``image-mlp``). The last 5,000 training
    images are the dev split (never trained on); the test set is a random subset of ``eval_examples``."""

    metric = "test error %"
    dataset = "fashion"
    dev_size = 5000

    def __init__(self, name: str, size: CNNSize | MLPSize, which: str, work: Path) -> None:
        self.name, self.size = name, size
        f = D.load_fashion(which)
        mean, std = 0.2860, 0.3530  # Fashion-MNIST training-set statistics
        conv = lambda x: ((torch.from_numpy(x).float() / 255.0 - mean) / std)[:, None]
        x, y = conv(f["x_train"]), torch.from_numpy(f["y_train"]).long()
        n_dev = min(self.dev_size, len(y) // 5)
        self.x_train, self.y_train = x[: len(y) - n_dev], y[: len(y) - n_dev]
        dev = _subset(n_dev, size.eval_examples)
        test = _subset(len(f["y_test"]), size.eval_examples)
        self.held = {"dev": (x[len(y) - n_dev:][dev], y[len(y) - n_dev:][dev]),
                     "test": (conv(f["x_test"])[test], torch.from_numpy(f["y_test"]).long()[test])}

    def build(self, variant: str, backend: str | None):
        s = self.size
        if isinstance(s, MLPSize):
            return MLP(28 * 28, s.hidden, s.layers, 10, variant, backend, dropout=s.dropout)
        return ConvPoolCNNC(s.c1, s.c2, variant, backend, dropout=s.dropout)

    def batch(self, seed: int, step: int, rank: int = 0, world: int = 1):
        idx = torch.from_numpy(_slice(len(self.y_train), self.size.batch, seed, step, rank, world))
        x = self.x_train[idx]
        import numpy as np

        flip = torch.from_numpy(np.random.default_rng([seed, step, rank]).random(len(idx)) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # horizontal flips (augmentation)
        return x, self.y_train[idx]

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model, split: str = "test") -> dict:
        xs, ys = self.held[split]
        model.eval()
        wrong = 0
        dev = _device(model)
        with torch.no_grad():
            for i in range(0, len(ys), 500):
                pred = model(xs[i:i + 500].to(dev)).argmax(-1).cpu()
                wrong += (pred != ys[i:i + 500]).sum().item()
        model.train()
        return {"test error %": round(100.0 * wrong / len(ys), 2), "examples": len(ys)}

    def dev_loss(self, model) -> float:
        xs, ys = self.held["dev"]
        n = min(self.size.dev_loss_examples, len(ys))
        return held_out_loss(self, model, [(xs[i:i + 256], ys[i:i + 256]) for i in range(0, n, 256)])

    def trivial_baseline(self) -> dict:
        return {"chance error %": 90.0}


TASK_CLASSES: dict[str, Any] = {"mt-gru": Translation, "mt-transformer": Translation, "image": Images,
                                 "image-mlp": Images, "retrieval": Retrieval}
assert tuple(TASK_CLASSES) == TASKS


def make_task(name: str, size: Schedule, which: str, work: Path) -> Task:
    """The task called ``name`` (one of TASKS); an unknown name is refused."""
    cls = TASK_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return cls(name, size, which, work)


def norm_shapes(name: str, size: Schedule) -> dict[str, tuple[int, int]]:
    """(rows, N) of task ``name``'s norm calls in one training step, by label: the norm-level timing's shapes."""
    if isinstance(size, TransformerMTSize):
        return {f"{name}: tokens x d_model": (size.batch * size.max_len, size.d_model)}
    if isinstance(size, (GRUMTSize, RetrievalSize)):  # the per-step norms of U h (four norms per GRU cell)
        return {f"{name}: batch x 2H gates": (size.batch, 2 * size.hidden),
                f"{name}: batch x H candidate": (size.batch, size.hidden)}
    if isinstance(size, MLPSize):
        return {f"{name}: batch x hidden": (size.batch, size.hidden)}
    if isinstance(size, CNNSize):
        return {f"{name}: maps x 28*28 positions": (size.batch * size.c1, 28 * 28),
                f"{name}: maps x 14*14 positions": (size.batch * size.c2, 14 * 14)}
    raise ValueError(f"no norm shapes for task {name!r}")


def data_file(name: str, which: str) -> str:
    """The name of the file task ``name`` reads its data from (``which``: "full" or "sample")."""
    return D.file_name(TASK_CLASSES[name].dataset, which)


def metric_of(name: str) -> str:
    """The headline quality metric of task ``name``."""
    metric: str = TASK_CLASSES[name].metric
    return metric
