"""The norm-level timing of `rmsnorm reproduce`: what it times is the same math in both settings."""

import pytest
import torch

from rmsnorm.reproduce.norms import TIMING_VARIANTS, Norm
from rmsnorm.reproduce.normtime import NORMS, SETTINGS, comparisons, implementation, time_norms


@pytest.mark.parametrize("norm", NORMS)
def test_fused_and_unfused_compute_the_same_norm(norm):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(6, 48, generator=g), torch.randn(48, generator=g), torch.randn(48, generator=g)
    fused, unfused = (implementation(s, norm, 48)(x, w, b) for s in ("fused", "unfused"))
    torch.testing.assert_close(unfused, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", TIMING_VARIANTS)
def test_timing_variants_match_their_fused_counterparts(variant):
    torch.manual_seed(0)
    ops, fused = Norm(variant, 32), Norm(variant.removesuffix("-ops"), 32)
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    torch.testing.assert_close(ops(x, residual=r), fused(x, residual=r), rtol=1e-5, atol=1e-5)


def test_time_norms_records_every_round_of_every_implementation():
    res = time_norms({"a": (4, 32), "b": (2, 64)}, budget_s=0.0, min_rounds=3, sample_s=0.001)
    assert res["rounds"] == 3 and set(res["shapes"]) == {"a", "b"}
    assert len(res["seconds"]) == 2 * len(SETTINGS) * len(NORMS)
    assert all(len(v) == 3 and min(v) > 0 for v in res["seconds"].values())
    for shape in ("a", "b"):
        for setting, ours, ref in comparisons(shape):
            assert f"{shape}/{setting}/{ours}" in res["seconds"] and f"{shape}/{setting}/{ref}" in res["seconds"]
