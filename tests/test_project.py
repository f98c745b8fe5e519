"""Project invariants: CI runs the README's test command verbatim; README keeps its two set-up commands."""

import re
from pathlib import Path

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
