"""Project invariants: CI runs the README's test command verbatim; README keeps its two set-up commands;
the whole-model benchmark script runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    head = text.split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", head, flags=re.S)


def test_readme_has_two_setup_commands_at_top():
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert "torch==${TORCH_VERSION:-2.13.0}" in cmds[0] and "torch==${TORCH_VERSION:-2.13.0}" in cmds[1]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci.splitlines()


def test_models_benchmark_runs_small(tmp_path):
    """benchmarks/models.py end to end on tiny models: the exact conversion is checked, both tables rows come out."""
    pytest.importorskip("transformers")
    out = tmp_path / "models.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "models.py"), "--rounds", "1", "--steps", "1", "--batch", "1",
           "--seq", "8", "--layers", "1", "--width", "64", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert "exact Pre-RMSNorm" in text and text.count("rmsnorm.accelerate") == 2 and "allocator" in text


def test_public_api_types_check(tmp_path):
    """py.typed ships, and the overloads let `y: Tensor = rms_norm(x)` and the residual form type-check."""
    mypy = pytest.importorskip("mypy.api")
    assert (ROOT / "src" / "rmsnorm" / "py.typed").exists()
    snippet = tmp_path / "use.py"
    snippet.write_text(
        "import torch, rmsnorm\nfrom torch import Tensor\n"
        "x = torch.randn(2, 8)\n"
        "y: Tensor = rmsnorm.rms_norm(x)\n"
        "a, b = rmsnorm.rms_norm(x, residual=x)\n"
        "m = rmsnorm.RMSNorm(8)\n"
        "z: Tensor = m.forward(x)\n"
        "p, q = m.forward(x, x)\n"
        "bad: Tensor = rmsnorm.rms_norm(x, residual=x)\n")
    out, _, status = mypy.run([str(snippet), "--follow-imports=silent", "--no-incremental"])
    assert status == 1 and out.count("error:") == 1 and ":9:" in out, out


def test_the_package_type_checks():
    """mypy over src/rmsnorm (configured in pyproject.toml) finds nothing."""
    mypy = pytest.importorskip("mypy.api")
    out, err, status = mypy.run(["--config-file", str(ROOT / "pyproject.toml"), str(ROOT / "src" / "rmsnorm")])
    assert status == 0, out + err


def test_user_facing_text_speaks_of_the_project_only():
    """No mention of issues, targets or ../shared files in code, CLI text or reports."""
    bad = re.compile(r"\.\./shared|anchors\.md|\bissue'?s?\b|\bBars?\b")
    hits = []
    for path in list((ROOT / "src").rglob("*.py")) + list((ROOT / "benchmarks").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if bad.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_bench_latency_mode_runs(tmp_path, monkeypatch):
    from rmsnorm.bench import latency

    monkeypatch.setattr(latency, "SHAPES", [(2, 64)])
    rows = latency.run(tmp_path, [__import__("torch").float32], threads=(1,))
    assert {r["provider"] for r in rows} == set(latency.PROVIDERS) and len(rows) == 3 * len(latency.PROVIDERS)
    assert all(r["median_us"] > 0 for r in rows)
    text = (tmp_path / "latency.md").read_text()
    assert "| 1 | 2×64 | float32 | fwd+bwd |" in text


def test_surgery_coverage_script_runs_a_subset(tmp_path):
    """benchmarks/surgery_coverage.py (docs/surgery.md) on the first few classes: every replaced one agrees."""
    pytest.importorskip("transformers")
    out = tmp_path / "surgery.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "surgery_coverage.py"), "--limit", "12",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    m = re.search(r"(\d+) classes: (\d+) replaced and compared, (\d+) within the targets", text)
    assert m and int(m.group(1)) == 12 and int(m.group(2)) > 0 and m.group(2) == m.group(3), text[:2000]


def test_model_level_surgery_script_runs_a_subset(tmp_path):
    """benchmarks/surgery_models.py (docs/surgery-models.md) on a few families: tiny models built, their norms
    replaced, logits and gradients within the targets, bitwise on the reference backend."""
    pytest.importorskip("transformers")
    out = tmp_path / "surgery-models.md"
    fams = "llama,gemma,t5,umt5,qwen2,helium,moshi,nemotron_h,olmo2,mistral,mamba2,qwen3_next"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "surgery_models.py"), "--families", fams,
                          "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    m = re.search(r"(\d+) families: (\d+) built with at least one norm replaced and compared, (\d+) within", text)
    assert m and int(m.group(1)) == 12 and int(m.group(2)) >= 10 and m.group(2) == m.group(3), text[:2000]
    assert "**no**" not in text


@pytest.mark.slow
def test_gpu_scripts_smoke_runs_in_the_interpreter(tmp_path):
    """The GPU session's scripts, on CPU tensors in Triton's interpreter at tiny sizes (they run for real only
    when a GPU is lent: they must not fail there for a reason a CPU run would have shown)."""
    pytest.importorskip("triton")
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    tune = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_tune.py"), "--smoke", "--out",
                           str(tmp_path / "tune"), "--table", str(tmp_path / "tuned.json")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert tune.returncode == 0, tune.stderr[-3000:]
    table = __import__("json").loads((tmp_path / "tuned.json").read_text())
    assert table["fwd"] and table["bwd"] and "Failed checks:\nnone" in (tmp_path / "tune" / "tune.md").read_text()
    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out",
                            str(tmp_path / "check"), "--budget", "120"],
                           capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert check.returncode == 0 and "correctness PASS" in check.stdout, (check.stdout + check.stderr)[-3000:]
    assert (tmp_path / "check" / "block.md").exists()
