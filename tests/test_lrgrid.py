"""Choosing every variant's learning rate on the dev split, and growing a grid where the best is at an end."""

from rmsnorm.reproduce.lrgrid import GRID_EXTENSIONS, best_lr, choose_lrs, next_lr


def _trainer(best: dict[str, float], calls: list):
    """A stand-in for training: dev error grows with the distance (in octaves) from a variant's best rate."""
    import math

    def train_all(runs):
        calls.append(runs)
        return {(v, s, lr): {"dev": {"test error %": 10 + abs(math.log2(lr / best[v]))}} for v, s, lr, _ in runs}
    return train_all


def test_best_and_next_rates():
    assert best_lr({1e-3: 12.0, 2e-3: 11.0, 4e-3: 11.0}, "test error %") == 2e-3  # the smaller one on a tie
    assert best_lr({1e-3: 12.0, 2e-3: 14.0}, "BLEU") == 2e-3
    assert next_lr({1e-3: 12.0, 2e-3: 11.0, 4e-3: 11.5}, "test error %") is None  # inside
    assert next_lr({5e-4: 10.8, 1e-3: 10.9, 2e-3: 11.0}, "test error %") == 2.5e-4  # below the bottom
    assert next_lr({6e-3: 10.3, 1.2e-2: 10.2, 2.4e-2: 9.96}, "test error %") == 4.8e-2  # above the top
    assert next_lr({1e-3: 10.0}, "test error %") is None


def test_a_grid_grows_only_where_a_variant_needs_it():
    calls: list = []
    grid = (1e-3, 2e-3, 4e-3)
    chosen = choose_lrs(grid, ["layernorm", "rmsnorm", "prmsnorm"], "test error %",
                        _trainer({"layernorm": 2e-3, "rmsnorm": 8e-3, "prmsnorm": 1e-1}, calls))
    # layernorm: inside; rmsnorm: 8e-3 found one step above the grid, then bracketed by 1.6e-2;
    # prmsnorm: still climbing after GRID_EXTENSIONS more rates
    assert chosen == {"layernorm": 2e-3, "rmsnorm": 8e-3, "prmsnorm": 1.6e-2}
    assert len(calls) == 1 + GRID_EXTENSIONS
    assert calls[1] == [("rmsnorm", 0, 8e-3, True), ("prmsnorm", 0, 8e-3, True)]
    assert calls[2] == [("rmsnorm", 0, 1.6e-2, True), ("prmsnorm", 0, 1.6e-2, True)]
    assert all(run[3] for batch in calls for run in batch) and {run[1] for batch in calls for run in batch} == {0}
