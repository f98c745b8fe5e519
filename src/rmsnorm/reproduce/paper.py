"""The paper's numbers (Zhang & Sennrich, NeurIPS 2019; docs/reproduction/README.md) for the experiments this
reproduction mirrors."""

from __future__ import annotations

from typing import Any

# variant -> (quality, time, % saved vs LayerNorm); time units as in the paper
PAPER: dict[str, dict[str, Any]] = {
    "mt-gru": {
        "title": "RNNSearch (GRU), WMT14 En-De, PyTorch; BLEU newstest2014, s per 1k steps",
        "metric": "BLEU", "time_unit": "s/1k steps",
        "rows": {"baseline": (22.7, 427, None), "layernorm": (23.2, 857, None), "rmsnorm": (22.9, 763, 11.0),
                 "prmsnorm": (23.2, 754, 12.0)},
        "also": "TensorFlow: LayerNorm 665 s, RMSNorm 501 s (24.7%), pRMSNorm 493 s (25.9%); "
                "Theano: LayerNorm 988 s, RMSNorm 652 s (34.0%), pRMSNorm 658 s (33.4%).",
    },
    "mt-transformer": {
        "title": "Transformer base, WMT14 En-De, TensorFlow, V100; BLEU newstest2014, s per 1k steps",
        "metric": "BLEU", "time_unit": "s/1k steps",
        "rows": {"baseline": (0.0, 210, None), "layernorm": (26.6, 248, None), "rmsnorm": (26.8, 231, 6.9),
                 "prmsnorm": (26.5, 225, 9.3)},
        "also": "The baseline without normalization fails to train (BLEU 0).",
    },
    "image": {
        "title": "ConvPool-CNN-C, CIFAR-10, Theano/Lasagne; test error %, s per epoch",
        "metric": "test error %", "time_unit": "s/epoch",
        "rows": {"baseline": (8.96, 21, None), "layernorm": (10.49, 39, None), "rmsnorm": (8.83, 31, 20.5),
                 "prmsnorm": (10.37, 30, 23.1)},
        "also": "BatchNorm 8.25% / 38 s, WeightNorm 8.28% / 23 s.",
    },
    "retrieval": {
        "title": "Image-caption retrieval, order embeddings (GRU text encoder), COCO, Theano; caption R@1 "
                 "(R@5/R@10 in the paper: baseline 79.7/88.8, LayerNorm 79.5/89.2, RMSNorm 79.7/89.5, "
                 "pRMSNorm 79.8/90.3), s per 0.1k steps",
        "metric": "R@1", "time_unit": "s/0.1k steps",
        "rows": {"baseline": (45.8, 2.11, None), "layernorm": (47.9, 12.02, None), "rmsnorm": (48.7, 7.12, 40.8),
                 "prmsnorm": (46.8, 4.34, 63.9)},
        "also": "The paper's largest time savings (40.8% and 63.9%).",
    },
}
