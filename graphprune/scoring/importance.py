"""Importance criteria: one registered class each, framework-free.

A criterion maps a :class:`~graphprune.coupling.Group` and the parameter
arrays (numpy, by qualified name) to one score per unit, aggregated over
*all* members of the group (the producing layer, norms, and the consumers).
Buffers (running statistics) never contribute.  Higher means more important.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..coupling.groups import Group
from ..errors import InvalidArgumentError

IMPORTANCE: dict[str, type[Importance]] = {}


def register_importance(name: str):
    def deco(cls):
        IMPORTANCE[name] = cls
        cls.name = name
        return cls
    return deco


def list_importance() -> list[str]:
    return sorted(IMPORTANCE)


def get_importance(spec) -> Importance:
    """Accept a registered name or an :class:`Importance` instance."""
    if isinstance(spec, Importance):
        return spec
    if isinstance(spec, str) and spec in IMPORTANCE:
        return IMPORTANCE[spec]()
    raise InvalidArgumentError(f"importance must be one of {list_importance()} or an Importance instance, got {spec!r}")


class Importance:
    """Base class.  Subclasses implement :meth:`position_scores`, or
    override ``__call__`` to score units directly."""

    name = "base"

    def position_scores(self, values: np.ndarray, axis: int) -> np.ndarray:  # pragma: no cover - abstract
        """One score per position of ``values`` along ``axis``; positions of a unit are summed."""
        raise NotImplementedError

    def finish(self, totals: np.ndarray) -> np.ndarray:
        return totals

    def __call__(self, group: Group, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        index = {u: i for i, u in enumerate(group.units)}
        totals = np.zeros(len(group.units), dtype=np.float64)
        for m in group.members:
            if m.is_buffer or not m.indices:
                continue
            scores = self.position_scores(np.asarray(arrays[m.param]), m.axis)
            np.add.at(totals, [index[u] for u in m.units], scores[list(m.indices)])
        return self.finish(totals)


def _others(values: np.ndarray, axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(values.ndim) if a != axis)


@register_importance("l1")
class L1Importance(Importance):
    """Sum of absolute values of every slice of the unit."""

    def position_scores(self, values, axis):
        return np.abs(values).sum(axis=_others(values, axis), dtype=np.float64)


@register_importance("l2")
class L2Importance(Importance):
    """Euclidean norm of all slices of the unit taken together."""

    def position_scores(self, values, axis):
        return np.square(values).sum(axis=_others(values, axis), dtype=np.float64)

    def finish(self, totals):
        return np.sqrt(totals)


@register_importance("random")
class RandomImportance(Importance):
    """Uniform random scores (a baseline); ``seed`` makes it reproducible."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, group, arrays):
        rng = np.random.default_rng(self.seed + group.id)
        return rng.random(len(group.units))
