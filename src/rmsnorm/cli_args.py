"""Argument parsing shared by the ``rmsnorm`` commands: one-line errors, validated values.

Every usage error of the command line is one line on stderr (``rmsnorm bench: error: ...``) and exit
status 2, raised either by argparse (through :class:`Parser`) or later by a command as :class:`UsageError`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn


class UsageError(Exception):
    """A bad value on the command line found after parsing: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its error as one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def choices_list(allowed: Iterable[str], what: str) -> Callable[[str], list[str]]:
    """A comma list, non-empty, each item one of ``allowed``."""
    known = list(allowed)

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"needs at least one {what}; choose from {', '.join(known)}")
        bad = [t for t in items if t not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, bad))}; choose from "
                                             f"{', '.join(known)}")
        return items

    return parse


def device(text: str) -> str:
    """cpu, cuda or cuda:N, and CUDA must be there for the latter."""
    import torch

    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (torch {torch.__version__})")
    return text


def backend_name(text: str) -> str:
    from .backends import registry

    try:
        registry.get(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def writable_dir(text: str) -> Path:
    """A folder that exists or can be made, and that can be written to."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".rmsnorm-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write to {text!r}: {exc.strerror or exc}") from None
    return path


def output_dir(path: Path) -> Path:
    """writable_dir for a default chosen by the command (not typed by the user): a UsageError if unusable."""
    try:
        return writable_dir(str(path))
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"output folder: {exc}") from None


def run_command(prog: str, fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; a UsageError becomes one line on stderr and exit status 2."""
    try:
        return fn(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
