"""Independent training runs at once (``rmsnorm reproduce --jobs N``), for CPUs whose cores one small run
cannot keep busy (on 2 cores one thread per run is 1.4-1.6x slower than two, so two runs at once finish
about a quarter sooner).

Each run goes to a worker process of its own (spawned, so no state is inherited) with ``threads // jobs``
torch threads; it builds its task from the same output folder (the data and tokenizers the parent
prepared) and calls :func:`rmsnorm.reproduce.runner.train_run`, which resumes from its checkpoint and
writes its result atomically, exactly as a run in the parent does. Only training runs go to the pool:
every timing phase stays in the parent, alone on the machine. A run's numbers depend on its thread count
(the order of reductions), so results compare across --jobs settings only statistically; the report's
meta.json records both.

A worker exits on its own when the parent process ends, however it ends (a kill included): the run it was
training resumes from its last checkpoint at the next invocation, and nothing outlives the command.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path

from .presets import Schedule

RunKey = tuple[str, int, float]  # (variant, seed, lr)

_TASKS: dict[tuple, object] = {}  # a worker's tasks, built once each


def _init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="parent-watch").start()


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    """Blocks until the parent process has ended, then ends this worker at once (its writes are atomic)."""
    parent.join()
    os._exit(1)


def _train(name: str, size: Schedule, data: str, work: Path, variant: str, seed: int, lr: float, run_dir: Path,
           backend: str | None, dev_split: bool, amp: str | None) -> dict:
    from .runner import Dist, train_run
    from .tasks import make_task

    key = (name, size, data, work)
    if key not in _TASKS:
        _TASKS[key] = make_task(name, size, data, work)
    return train_run(_TASKS[key], variant, seed, lr, run_dir, "cpu", backend, Dist("cpu"), dev_split=dev_split,
                     amp=amp)


class RunPool:
    """``jobs`` worker processes of ``threads`` torch threads each; :meth:`train` runs a task's runs on them."""

    def __init__(self, jobs: int, threads: int) -> None:
        self.jobs, self.threads = jobs, threads
        self._pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                                         initargs=(threads,))

    def train(self, name: str, size: Schedule, data: str, work: Path, runs: Iterable[tuple[str, int, float, bool]],
              run_dir: Callable[[str, int, float], Path], backend: str | None, amp: str | None,
              done: Callable[[RunKey, dict], None]) -> dict[RunKey, dict]:
        """Every (variant, seed, lr, dev_split) of ``runs`` trained; ``done`` is called in the parent as each
        finishes (in finishing order). A run that raises raises here, after the others have finished."""
        futures: dict[Future, RunKey] = {}
        for v, s, lr, dev_split in runs:
            fut = self._pool.submit(_train, name, size, data, work, v, s, lr, run_dir(v, s, lr), backend, dev_split,
                                    amp)
            futures[fut] = (v, s, lr)
        results: dict[RunKey, dict] = {}
        error: BaseException | None = None
        for fut in as_completed(futures):
            try:
                results[futures[fut]] = fut.result()
            except BaseException as exc:  # the first failure is raised once every other run is done
                error = error or exc
                continue
            done(futures[fut], results[futures[fut]])
        if error is not None:
            raise error
        return results

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
