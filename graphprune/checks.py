"""Argument checks shared by the PyTorch and ONNX APIs (one message template)."""

from __future__ import annotations

from .errors import InvalidArgumentError


def bad(name: str, expected: str, got) -> InvalidArgumentError:
    return InvalidArgumentError(f"{name} must be {expected}, got {got!r}")


def check_ratio(ratio, name: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise bad(name, "a number in [0, 1)", ratio)
    return float(ratio)


def check_round_to(round_to) -> int:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise bad("round_to", "a positive integer", round_to)
    return round_to


def check_budget(ratio, macs, params, latency=None) -> tuple[str, float]:
    """Exactly one of ``ratio`` / ``macs`` / ``params`` / ``latency`` (default ``ratio=0.5``).

    ``ratio`` is the fraction of each group's channels to remove; the others
    are the fractions of the dense model's cost to *keep*.
    """
    given = {k: v for k, v in (("ratio", ratio), ("macs", macs), ("params", params), ("latency", latency))
             if v is not None}
    if len(given) > 1:
        raise InvalidArgumentError(f"give one budget, not {' and '.join(given)}")
    if not given:
        return "ratio", 0.5
    kind, value = next(iter(given.items()))
    if kind == "ratio":
        return kind, check_ratio(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise bad(kind, "a fraction of the dense model in (0, 1]", value)
    return kind, float(value)


def check_allocation(allocation, normalizer, max_ratio, comparable: bool = False) -> dict:
    """Options of global allocation, validated once for every API.  ``None``
    picks the default: with ``comparable`` scores (the same unit in every
    group) one global ranking without a normaliser, else one ratio per group
    (and the ``mean`` normaliser if global is asked for)."""
    from .planning.budget import ALLOCATIONS
    from .planning.planner import NORMALIZERS

    if allocation is None:
        allocation = "global" if comparable else "local"
    if normalizer is None:
        normalizer = "none" if comparable else "mean"
    if allocation not in ALLOCATIONS:
        raise bad("allocation", f"one of {ALLOCATIONS}", allocation)
    if normalizer not in NORMALIZERS:
        raise bad("normalizer", f"one of {tuple(NORMALIZERS)}", normalizer)
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not 0 < max_ratio < 1:
        raise bad("max_ratio", "a number in (0, 1)", max_ratio)
    return {"allocation": allocation, "normalizer": normalizer, "max_ratio": float(max_ratio)}
