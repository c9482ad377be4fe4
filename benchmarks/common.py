"""Helpers the benchmark scripts share (``benchmarks/`` is not a package; scripts
import this with their own folder first on ``sys.path``)."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_state() -> str:
    """``git describe --dirty`` of the checkout the benchmark runs from (it may
    be edited while a long sweep runs, so the tables record it)."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
        return out.stdout.strip() or "no git"
    except OSError:
        return "no git"


def write_text(path: str | None, text: str) -> None:
    """Write ``text`` (ending in one newline) to ``path``, creating its folder; no-op without a path."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")
