"""The learning rate of every variant, chosen on a task's dev split.

Seed 0 of every variant is trained at every rate of the preset's grid; where a variant's best rate is at an
end of its grid, one more rate beyond that end is tried (one step of the grid's own ratio there), up to
:data:`GRID_EXTENSIONS` times, so that a choice is bracketed by worse rates wherever that allows. The same
procedure for every variant: each gets the grid it needs, and the report lists every rate tried.
"""

from __future__ import annotations

from collections.abc import Callable

from .stats import HIGHER_IS_BETTER

GRID_EXTENSIONS = 2  # at most this many learning rates beyond a preset's grid, per variant and task


def best_lr(dev: dict[float, float], metric: str) -> float:
    """The grid lr with the best dev metric (the smaller lr on a tie)."""
    sign = 1 if HIGHER_IS_BETTER[metric] else -1
    return max(sorted(dev), key=lambda lr: (sign * dev[lr], -lr))


def choose_lrs(grid: tuple[float, ...], variants: list[str], metric: str,
               train_all: Callable[[list[tuple[str, int, float, bool]]], dict]) -> dict[str, float]:
    """Every variant's learning rate: seed 0 trained at every point of ``grid`` (with the dev split's
    metric), then, up to :data:`GRID_EXTENSIONS` times, one more rate beyond the end of a variant's grid
    where its best is; the best on the dev split."""
    swept = train_all([(v, 0, lr, True) for v in variants for lr in grid])
    grids = {v: list(grid) for v in variants}

    def dev(v: str) -> dict[float, float]:
        return {lr: swept[(v, 0, lr)]["dev"][metric] for lr in grids[v]}

    for _ in range(GRID_EXTENSIONS):
        beyond = {v: lr for v in variants if (lr := next_lr(dev(v), metric)) is not None}
        if not beyond:
            break
        swept.update(train_all([(v, 0, lr, True) for v, lr in beyond.items()]))
        for v, lr in beyond.items():
            grids[v].append(lr)
    return {v: best_lr(dev(v), metric) for v in variants}


def next_lr(dev: dict[float, float], metric: str) -> float | None:
    """Where a variant's best rate is at an end of its grid, the next rate beyond that end (one step of the
    grid's own ratio at that end, 3 significant digits), so that every choice is bracketed by worse rates
    where the extensions allow; None when the best is inside."""
    lrs = sorted(dev)
    if len(lrs) < 2:
        return None
    best = best_lr(dev, metric)
    if best == lrs[-1]:
        return float(f"{best * lrs[-1] / lrs[-2]:.3g}")
    if best == lrs[0]:
        return float(f"{best * lrs[0] / lrs[1]:.3g}")
    return None
