"""Argument checks shared by the PyTorch and ONNX APIs (one message template)."""

from __future__ import annotations

from .errors import InvalidArgumentError


def bad(name: str, expected: str, got) -> InvalidArgumentError:
    return InvalidArgumentError(f"{name} must be {expected}, got {got!r}")


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise bad("ratio", "a number in [0, 1)", ratio)
    return float(ratio)


def check_round_to(round_to) -> int:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise bad("round_to", "a positive integer", round_to)
    return round_to
