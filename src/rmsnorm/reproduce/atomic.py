"""Writes that never leave a half-written file behind: write beside the target, then os.replace it.

An interrupted run therefore finds every result, checkpoint, table and report either whole or absent. The
temporary name is unique to the writing process, so processes writing the same file at once (the ranks of a
distributed run building the same tokenizer) each replace it whole and never take each other's half-written file.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_file(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes the whole file at a temporary path beside ``path``, which then replaces it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_text(path: Path, text: str) -> None:
    atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def atomic_json(path: Path, obj: dict) -> None:
    atomic_text(path, json.dumps(obj, indent=1, sort_keys=True))


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save, atomically."""
    import torch

    atomic_file(path, lambda tmp: torch.save(obj, tmp))
