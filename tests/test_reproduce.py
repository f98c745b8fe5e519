"""`rmsnorm reproduce`: seconds-long smoke runs of every task and variant on the shipped real-data sample,
resume after an interruption, the report, bad arguments, and a 2-process gloo DDP run."""

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rmsnorm.reproduce import data as D
from rmsnorm.reproduce.cli import main as reproduce_main
from rmsnorm.reproduce.norms import TIMING_VARIANTS, VARIANTS, Norm, SpatialNorm
from rmsnorm.reproduce.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def _args(out: Path, **kw):
    import argparse

    base = {"preset": "smoke", "tasks": ",".join(TASKS), "variants": ",".join(VARIANTS), "seeds": None,
            "steps": None, "device": "cpu", "backend": None, "threads": None, "out": out, "dry_run": False,
            "no_progress": True, "jobs": 1}
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert reproduce_main(_args(out)) == 0
    return out


def test_sample_data_is_real_and_shipped():
    bible = D.load_bible("sample")
    assert len(bible["train"].src) == 600 and len(bible["test"].tgt) == 80
    assert "God" in " ".join(bible["train"].src) and "Dios" in " ".join(bible["train"].tgt)
    f = D.load_fashion("sample")
    assert f["x_train"].shape == (1200, 28, 28) and set(f["y_train"].tolist()) == set(range(10))


def test_diatheke_parser():
    text = ('<title canonical="true">A Psalm.</title> <l sID="x"/>Psalms 3:1: Yahweh, how <w savlm="s">my</w> '
            'adversaries have increased!<l eID="x"/>\n<note>n</note>Psalms 3:2: Many there are &amp; more.\n'
            '(engWEB2015eb)\n')
    assert D.parse_diatheke(text) == {("Psalms", 3, 1): "Yahweh, how my adversaries have increased!",
                                      ("Psalms", 3, 2): "Many there are & more."}


def _result(out: Path, task: str, variant: str, seed: int = 0) -> dict:
    lr = json.loads((out / "lr" / f"{task}.json").read_text())[variant]
    return json.loads((out / "runs" / task / variant / f"lr{lr:g}" / f"seed{seed}" / "result.json").read_text())


def test_every_task_and_variant_runs(smoke_run):
    for t in TASKS:
        for v in VARIANTS:
            r = _result(smoke_run, t, v)
            assert r["steps"] == 6 and r["curve"] and r["train_seconds"] > 0
            assert r["dev_curve"][-1][0] == 6 and all(c[1] > 0 for c in r["dev_curve"])
            metric = {"image": "test error %", "image-mlp": "test error %", "retrieval": "R@1"}.get(t, "BLEU")
            assert 0.0 <= r[metric] <= 100.0
            assert not list((smoke_run / "runs" / t / v).rglob("checkpoint.pt"))
        timing = json.loads((smoke_run / "timing" / f"{t}.json").read_text())
        assert set(timing["seconds_per_step"]) == set(VARIANTS) | set(TIMING_VARIANTS)
    # the grid of image-mlp: every lr at seed 0, with the dev split scored, grown past an end where the
    # best is there: the choice is inside its grid unless the extensions ran out
    from rmsnorm.reproduce.lrgrid import GRID_EXTENSIONS

    grid = list((smoke_run / "runs" / "image-mlp" / "rmsnorm").glob("lr*/seed0/result.json"))
    assert all("dev" in json.loads(p.read_text()) for p in grid)
    lrs = sorted(float(p.parent.parent.name.removeprefix("lr")) for p in grid)
    assert {1e-3, 3e-3} <= set(lrs) and len(lrs) <= 2 + GRID_EXTENSIONS
    chosen = json.loads((smoke_run / "lr" / "image-mlp.json").read_text())["rmsnorm"]
    assert chosen in lrs and (lrs[0] < chosen < lrs[-1] or len(lrs) == 2 + GRID_EXTENSIONS)


def test_report_and_outputs(smoke_run):
    report = (smoke_run / "report.md").read_text()
    for needle in ("## Verdicts", "C1:", "C2:", "C3:", "Norm-level time", "unfused", "paper: BLEU", "prmsnorm",
                   "torch-rmsnorm", "copy-source BLEU", "figures/image.png", "paper: R@1", "chance R@1",
                   "chosen on the dev split", "How much of a step", "held-out loss change",
                   "runs converged", "Training runs converged", "Evaluated on", "held-out loss measured on"):
        assert needle in report, needle
    res = json.loads((smoke_run / "results.json").read_text())
    assert {"raw", "comparisons", "verdicts", "rows"} <= set(res)
    assert len(res["raw"]["runs"]) >= len(TASKS) * len(VARIANTS)
    assert set(res["verdicts"]) == {"C1", "C2", "C3"}
    kinds = {c["kind"] for c in res["comparisons"]}
    assert kinds == {"quality", "step time", "norm time"}
    assert (smoke_run / "results.csv").read_text().startswith("task,variant")
    # a tokenizer is cached under the name of the data it was trained on (a resplit corpus trains its own)
    assert [p.name for p in (smoke_run / "work").glob("bpe-*")] == ["bpe-300-bible-sample.en-es.json"]
    for t in TASKS:
        assert (smoke_run / "figures" / f"{t}.png").stat().st_size > 1000


def test_verdicts_are_recomputed_from_results_json_alone(smoke_run):
    from rmsnorm.reproduce.report import analyse

    res = json.loads((smoke_run / "results.json").read_text())
    again = json.loads(json.dumps(analyse(res["raw"])))
    assert again["verdicts"] == res["verdicts"]
    report = (smoke_run / "report.md").read_text()
    for claim, v in res["verdicts"].items():
        assert f"**{v['overall']}**" in report.split(f"| {claim}:")[1].split("\n")[0]


def test_finished_runs_are_not_retrained(smoke_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in (smoke_run / "runs").rglob("result.json")}
    assert reproduce_main(_args(smoke_run)) == 0
    after = {p: p.stat().st_mtime_ns for p in (smoke_run / "runs").rglob("result.json")}
    assert before == after


def test_a_folder_trained_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    """Resuming keeps finished runs, so resuming with other settings would mix runs in one report: refused
    (exit 2, one line naming the setting), nothing touched. A grown lr grid and another task are fine."""
    from rmsnorm.reproduce import presets

    out = tmp_path / "r"
    assert reproduce_main(_args(out, tasks="image-mlp", variants="rmsnorm")) == 0
    results = {p: p.read_bytes() for p in (out / "runs").rglob("result.json")}
    capsys.readouterr()
    assert reproduce_main(_args(out, tasks="image-mlp", variants="rmsnorm", steps=4)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "image-mlp runs trained with other settings: steps 6 (now 4)" in err
    assert reproduce_main(_args(out, tasks="image-mlp", variants="rmsnorm", steps=4, dry_run=True)) == 2
    assert "steps 6 (now 4)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (out / "runs").rglob("result.json")} == results
    smoke = presets.PRESETS["smoke"]
    mlp = smoke.tasks["image-mlp"]
    grown = replace(smoke, tasks={**smoke.tasks, "image-mlp": replace(mlp, lrs=(*mlp.lrs, 1e-2))})
    monkeypatch.setitem(presets.PRESETS, "smoke", grown)
    assert reproduce_main(_args(out, tasks="image-mlp", variants="rmsnorm")) == 0
    assert (out / "runs/image-mlp/rmsnorm/lr0.01/seed0/result.json").exists()
    assert reproduce_main(_args(out, tasks="image", variants="rmsnorm")) == 0
    assert set(json.loads((out / "meta.json").read_text())["trained_with"]) == {"image", "image-mlp"}


def test_settings_recorded_later_take_their_earlier_values(tmp_path):
    """A folder written before a setting was recorded was trained with that setting's earlier value: 512
    held-out loss examples and the data files of that time. The Bible's file (and split) has changed since,
    so its translation runs are refused; the images' file has not, so their runs resume."""
    from rmsnorm.reproduce import cli, presets
    from rmsnorm.reproduce.cli import UsageError

    full = presets.PRESETS["full"]
    now = {t: cli._trained_with(full, t, "cpu", "auto") for t in ("mt-gru", "image")}
    earlier = {t: {k: v for k, v in w.items() if k not in ("data_file", "dev_loss_examples")}
               for t, w in now.items()}
    (tmp_path / "runs" / "image").mkdir(parents=True)
    cli._check_folder(tmp_path, {"trained_with": earlier}, {"image": now["image"]})
    (tmp_path / "runs" / "mt-gru").mkdir()
    with pytest.raises(UsageError, match=r"mt-gru runs .*data_file 'bible.en-es.tsv' .*dev_loss_examples 512"):
        cli._check_folder(tmp_path, {"trained_with": earlier}, {"mt-gru": now["mt-gru"]})


def test_resume_after_interruption(tmp_path, monkeypatch):
    """Interrupt a run after 4 of 6 steps (KeyboardInterrupt), then resume: the run restarts from its
    checkpoint and ends exactly where an uninterrupted run ends."""
    import rmsnorm.reproduce.runner as runner

    full = tmp_path / "full"
    assert reproduce_main(_args(full, tasks="image", variants="rmsnorm")) == 0
    part = tmp_path / "part"
    real = runner.train_run
    calls = {"n": 0}

    def interrupting(task, variant, seed, lr, run_dir, device, backend, dd, on_step=None, **kw):
        def hook(step, loss):
            calls["n"] = step
            if step == 4:
                raise KeyboardInterrupt
        return real(task, variant, seed, lr, run_dir, device, backend, dd, on_step=hook, **kw)

    monkeypatch.setattr(runner, "train_run", interrupting)
    assert reproduce_main(_args(part, tasks="image", variants="rmsnorm")) == 130
    ck = torch.load(part / "runs/image/rmsnorm/lr0.002/seed0/checkpoint.pt", weights_only=False)
    assert ck["step"] == 4
    monkeypatch.setattr(runner, "train_run", real)
    assert reproduce_main(_args(part, tasks="image", variants="rmsnorm")) == 0
    a = _result(full, "image", "rmsnorm")
    b = _result(part, "image", "rmsnorm")
    assert a["test error %"] == b["test error %"]
    assert [c[2] for c in a["curve"]] == pytest.approx([c[2] for c in b["curve"]], rel=1e-4)
    assert [c[1] for c in a["dev_curve"]] == pytest.approx([c[1] for c in b["dev_curve"]], rel=1e-4)


def test_convergence_is_judged_on_the_held_out_loss():
    from rmsnorm.reproduce.report import _dev_change, converged

    falling = [[100, 2.0], [200, 1.5], [800, 1.10], [900, 1.05], [1000, 1.0]]
    assert _dev_change(falling, 1000) == pytest.approx(-100 * 0.1 / 1.1)
    assert converged({"dev_loss_change_last_fifth_pct": _dev_change(falling, 1000)}) is False
    flat = [[100, 2.0], [800, 1.0], [1000, 0.995]]
    assert converged({"dev_loss_change_last_fifth_pct": _dev_change(flat, 1000)}) is True
    rising = [[800, 1.0], [1000, 1.2]]  # past its best point: more training would not help
    assert converged({"dev_loss_change_last_fifth_pct": _dev_change(rising, 1000)}) is True
    assert _dev_change([[1000, 1.0]], 1000) is None and converged({}) is None


def test_schedules_warm_up_then_decay_to_zero():
    from rmsnorm.reproduce.presets import PRESETS, Schedule
    from rmsnorm.reproduce.runner import lr_at

    s = Schedule(steps=1000, batch=1, lr=1.0, warmup=100, decay=True)
    assert lr_at(s, 1.0, 0) == pytest.approx(0.01) and lr_at(s, 1.0, 99) == pytest.approx(1.0)
    assert lr_at(s, 1.0, 550) == pytest.approx(0.5) and lr_at(s, 1.0, 999) == pytest.approx(1 / 900)
    assert lr_at(Schedule(steps=10, batch=1, lr=1.0, warmup=4), 1.0, 15) == pytest.approx(0.5)  # inverse sqrt
    assert lr_at(Schedule(steps=10, batch=1, lr=1.0, decay=True), 1.0, 5) == pytest.approx(0.5)
    for name, size in PRESETS["full"].tasks.items():  # every full-preset task ends its schedule at lr 0
        assert size.decay and len(size.lrs) >= 2, name
    gpu = PRESETS["gpu"]
    assert set(gpu.default_tasks) <= set(gpu.tasks) and gpu.autocast == "bfloat16"


def test_bad_names_and_dry_run(tmp_path, capsys):
    assert reproduce_main(_args(tmp_path, preset="huge")) == 2
    assert reproduce_main(_args(tmp_path, tasks="mt-lstm")) == 2
    assert reproduce_main(_args(tmp_path, variants="batchnorm")) == 2
    err = capsys.readouterr().err
    assert "huge" in err and "mt-lstm" in err and "batchnorm" in err
    assert reproduce_main(_args(tmp_path, dry_run=True)) == 0
    # smoke: 4 tasks x 5 variants x 1 seed, and image-mlp's 2-rate grid per variant plus 2 rates beyond an end
    assert "at most 40 training runs" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_runs_at_once_give_the_numbers_of_runs_one_after_another(tmp_path, capsys):
    """--jobs 2 on 2 threads: each run in its own process on one thread, every run of the plan trained once,
    and the same numbers as the same runs trained in order on one thread."""
    threads = torch.get_num_threads()
    kw = {"tasks": "image-mlp", "variants": "layernorm,rmsnorm"}
    try:
        torch.set_num_threads(2)
        assert reproduce_main(_args(tmp_path / "pool", jobs=2, **kw)) == 0
        assert "2 runs at once" in capsys.readouterr().out
        assert reproduce_main(_args(tmp_path / "serial", threads=1, **kw)) == 0
    finally:
        torch.set_num_threads(threads)
    pooled = sorted((tmp_path / "pool" / "runs").rglob("result.json"))
    serial = sorted((tmp_path / "serial" / "runs").rglob("result.json"))
    assert [p.relative_to(tmp_path / "pool") for p in pooled] == [p.relative_to(tmp_path / "serial") for p in serial]
    assert len(pooled) >= 4  # two variants at two grid points (seed 0), and any rate tried beyond an end
    for a, b in zip(pooled, serial, strict=True):
        ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
        # curve points are (step, seconds, loss): the same losses at the same steps
        assert ra["test error %"] == rb["test error %"], a
        assert [(c[0], c[2]) for c in ra["curve"]] == [(c[0], c[2]) for c in rb["curve"]], a
    meta = json.loads((tmp_path / "pool" / "meta.json").read_text())
    assert meta["jobs"] == 2 and meta["threads_per_run"] == 1
    assert reproduce_main(_args(tmp_path / "x", jobs=64, **kw)) == 2
    assert "--jobs 64" in capsys.readouterr().err


_KILLED_PARENT = """
import os, sys, time
from rmsnorm.reproduce.pool import RunPool
pool = RunPool(1, 1)
print(pool._pool.submit(os.getpid).result(), flush=True)
pool._pool.submit(time.sleep, 120)
time.sleep(120)
"""


def test_a_killed_parent_leaves_no_worker_behind():
    """SIGKILL on the command (no cleanup runs in it): its training worker ends within seconds."""
    import signal
    import time

    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        os.kill(worker, 0)  # alive
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its parent")


def test_missing_data_is_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RMSNORM_DATA", str(tmp_path / "nodata"))
    monkeypatch.setattr(D, "FASHION_DIR", tmp_path / "nothing")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert reproduce_main(_args(tmp_path / "o", preset="quick", tasks="image-mlp")) == 3
    assert "apt-get install" in capsys.readouterr().err


@pytest.mark.parametrize("variant", VARIANTS)
def test_norm_variants(variant):
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    n = Norm(variant, 16)
    y = n(x, residual=r)
    assert y.shape == x.shape
    if variant == "baseline":
        assert torch.equal(y, x + r)
    elif variant == "layernorm":
        assert torch.allclose(y.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-3)
    elif variant in ("rmsnorm", "torch-rmsnorm"):  # gain 1, bias 0 at initialisation
        assert torch.allclose(y.square().mean(-1), torch.ones(3, 5), atol=1e-3)
    s = SpatialNorm(variant, 4)(torch.randn(2, 4, 6, 6))
    assert s.shape == (2, 4, 6, 6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_many(args):
    from rmsnorm.reproduce.atomic import atomic_text

    path, i = args
    for _ in range(100):
        atomic_text(Path(path), str(i) * 4096)


def test_processes_writing_one_file_at_once_each_replace_it_whole(tmp_path):
    import multiprocessing

    target = tmp_path / "shared.json"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        pool.map(_write_many, [(str(target), i) for i in range(3)])
    text = target.read_text()
    assert text in {str(i) * 4096 for i in range(3)}
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]


@pytest.mark.slow
def test_ddp_two_gloo_processes(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={env['MASTER_PORT']}", "-m", "rmsnorm", "reproduce", "--preset", "smoke", "--tasks",
           "image,mt-transformer,retrieval", "--variants", "layernorm,rmsnorm", "--out", str(tmp_path), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    for t in ("image", "mt-transformer", "retrieval"):
        r = _result(tmp_path, t, "rmsnorm")
        assert r["world_size"] == 2 and r["steps"] == 6
    assert (tmp_path / "report.md").exists()


def test_retrieval_scores_and_loss(tmp_path):
    """Recall@k counts the rank of each verse's own translation; the hinge loss is zero once every pair
    beats every in-batch negative by the margin."""
    from rmsnorm.reproduce.presets import PRESETS
    from rmsnorm.reproduce.tasks import make_task

    task = make_task("retrieval", PRESETS["smoke"].tasks["retrieval"], "sample", tmp_path)
    n = len(task.held_tgt["test"])

    class Oracle(torch.nn.Module):  # verse i -> basis vector i on both sides
        def embed(self, tok, side):
            ids = torch.arange(self.start, self.start + len(tok))
            self.start = (self.start + len(tok)) % n
            return torch.nn.functional.one_hot(ids, n).float()

    oracle = Oracle()
    oracle.start = 0
    r = task.evaluate(oracle)
    assert r["R@1"] == r["Es→En R@1"] == 100.0 and r["median rank"] == 1 and r["examples"] == n
    e = torch.eye(4)
    assert task.loss(lambda a, b: (e, e), (None, None)).item() == 0.0
    assert task.loss(lambda a, b: (e, e.flip(0)), (None, None)).item() > 0.0


def test_allocator_choice(monkeypatch):
    """--allocator auto re-runs the console command under tcmalloc when it is installed, never under
    torchrun or when called as a function; tcmalloc without the library is a clear error."""
    from rmsnorm import host as alloc
    from rmsnorm.reproduce import cli

    calls = []
    monkeypatch.setattr(alloc, "reexec_under_tcmalloc", calls.append)
    monkeypatch.setattr(alloc, "allocator", lambda: "glibc malloc")
    monkeypatch.setattr(alloc, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    cli._maybe_tcmalloc("auto")
    assert calls == []  # not the console script: argv is not ours to re-run
    monkeypatch.setattr(sys, "argv", ["rmsnorm", "reproduce", "--preset", "smoke"])
    cli._maybe_tcmalloc("current")
    assert calls == []
    cli._maybe_tcmalloc("auto")
    assert calls == ["/lib/libtcmalloc_minimal.so.4"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    cli._maybe_tcmalloc("auto")
    assert len(calls) == 1  # torchrun: every rank keeps its allocator
    monkeypatch.setattr(alloc, "find_tcmalloc", lambda: None)
    monkeypatch.delenv("WORLD_SIZE")
    cli._maybe_tcmalloc("auto")
    assert len(calls) == 1
    with pytest.raises(SystemExit, match="libtcmalloc-minimal4"):
        cli._maybe_tcmalloc("tcmalloc")


@pytest.mark.parametrize("task", TASKS)
def test_evaluation_feeds_the_model_on_its_own_device(task, tmp_path, monkeypatch):
    """No GPU needed: the model reports another device (meta) and checks every input it is given."""
    from rmsnorm.reproduce import tasks as T
    from rmsnorm.reproduce.presets import get_preset

    t = T.make_task(task, get_preset("smoke").tasks[task], "sample", tmp_path)
    model = t.build("rmsnorm", None)
    monkeypatch.setattr(T, "_device", lambda m: torch.device("meta"))
    seen = []

    def on_meta(fn):
        def wrapped(x, *a, **k):
            seen.append(x.device.type)
            return fn(torch.empty_like(x, device="cpu").copy_(torch.zeros(x.shape, dtype=x.dtype)), *a, **k)
        return wrapped

    for attr in ("greedy", "embed"):
        if hasattr(model, attr):
            monkeypatch.setattr(model, attr, on_meta(getattr(model, attr)))
    if task.startswith("image"):
        real = model.forward
        monkeypatch.setattr(model, "forward", on_meta(real))
    t.evaluate(model)
    assert seen and set(seen) == {"meta"}


def test_committed_reproduction_verdicts_and_prose_agree():
    """docs/reproduction: the verdicts recompute from its results.json alone, and the prose of its README and
    report.md states each claim's overall verdict and counts as computed."""
    from rmsnorm.reproduce.report import analyse

    docs = ROOT / "docs" / "reproduction"
    res = json.loads((docs / "results.json").read_text())
    again = json.loads(json.dumps(analyse(res["raw"])))
    assert again["verdicts"] == res["verdicts"]
    prose = (docs / "README.md").read_text().replace("\n  ", " ").replace("\n", " ")
    report = (docs / "report.md").read_text()
    for claim, v in res["verdicts"].items():
        assert f"**{claim}," in prose and f"{v['overall']} — {v['counts']}.**" in prose.split(f"**{claim},")[1], claim
        assert f"**{v['overall']}** ({v['counts']})" in report
