"""Importance criteria: one registered class each, framework-free.

A criterion maps a :class:`~graphprune.coupling.Group` and the parameter
arrays (numpy, by qualified name) to one score per unit, aggregated over
the group's members (the producing layer, norms, and the consumers).
Buffers (running statistics) never contribute.  Higher means more important.

Aggregation: each member gives a raw score per unit (its positions of that
unit summed); ``reduction`` combines members (``sum``, ``mean``, ``max``,
``prod`` or ``first`` = the first member that covers the unit, producers
first); ``finish`` maps the result (``sqrt`` for L2).  A member that does
not cover a unit does not take part in that unit's reduction.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..coupling.groups import Group
from ..errors import InvalidArgumentError

IMPORTANCE: dict[str, type[Importance]] = {}
REDUCTIONS = ("sum", "mean", "max", "prod", "first")


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
    """Base class.  Subclasses implement :meth:`position_scores` (and may
    restrict :meth:`members`), or override ``__call__`` to score units directly."""

    name = "base"
    statistic = "weight"  # what the arrays hold: weights, or a calibration statistic
    fallback = False      # score groups without a member this criterion reads by L2
    comparable = False    # scores mean the same thing in every group (one global ranking needs no normaliser)

    def __init__(self, reduction: str = "sum"):
        if reduction not in REDUCTIONS:
            raise InvalidArgumentError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def position_scores(self, values: np.ndarray, axis: int) -> np.ndarray:  # pragma: no cover - abstract
        """One score per position of ``values`` along ``axis``; positions of a unit are summed."""
        raise NotImplementedError

    def members(self, group: Group) -> list:
        """The members that contribute (default: every non-buffer member)."""
        return [m for m in group.members if not m.is_buffer and m.indices]

    def finish(self, totals: np.ndarray) -> np.ndarray:
        return totals

    def member_scores(self, group: Group, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[members, units]`` raw scores, NaN where a member lacks the unit."""
        index = {u: i for i, u in enumerate(group.units)}
        members = self.scored_members(group, arrays)
        table = np.full((len(members), len(group.units)), np.nan)
        for row, m in enumerate(members):
            scores = self.position_scores(np.asarray(arrays[m.param]), m.axis)
            cols = np.fromiter((index[u] for u in m.units), dtype=np.int64, count=len(m.units))
            acc = np.bincount(cols, weights=scores[list(m.indices)], minlength=len(group.units))
            seen = np.bincount(cols, minlength=len(group.units)) > 0
            table[row, seen] = acc[seen]
        return table

    def scored_members(self, group: Group, arrays: Mapping[str, np.ndarray]) -> list:
        """The members this criterion scores itself: :meth:`members` whose array it has."""
        return [m for m in self.members(group) if self.statistic == "weight" or m.param in arrays]

    def covers(self, group: Group, arrays: Mapping[str, np.ndarray]) -> bool:
        """Whether some member of ``group`` is scored by this criterion itself (not by the L2 fallback)."""
        return bool(self.scored_members(group, arrays))

    def __call__(self, group: Group, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        table = self.member_scores(group, arrays)
        if table.shape[0] == 0:
            if self.fallback:  # nothing this criterion reads: score by magnitude instead
                return L2Importance(self.reduction)(group, getattr(arrays, "weights", arrays))
            return np.zeros(len(group.units))
        return self.finish(np.nan_to_num(_reduce(table, self.reduction)))


def _reduce(table: np.ndarray, how: str) -> np.ndarray:
    covered = ~np.isnan(table)
    if how == "sum":
        return np.nansum(table, axis=0)
    if how == "mean":
        return np.nansum(table, axis=0) / np.maximum(covered.sum(axis=0), 1)
    if how == "max":
        return np.where(covered, table, -np.inf).max(axis=0)
    if how == "prod":
        return np.where(covered, table, 1.0).prod(axis=0)
    first = covered.argmax(axis=0)
    return table[first, np.arange(table.shape[1])]


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
        return np.sqrt(np.maximum(totals, 0))


@register_importance("bn_scale")
class NormScaleImportance(Importance):
    """|scale| of the BatchNorm / LayerNorm / InstanceNorm affine in the group
    (network slimming).  Groups without a norm scale are scored by L2."""

    NORMS = ("batch_norm", "layer_norm", "instance_norm")

    def members(self, group):
        return [m for m in super().members(group) if m.op in self.NORMS and m.slot == 1]

    def position_scores(self, values, axis):
        return np.abs(values).astype(np.float64)

    fallback = True


@register_importance("fpgm")
class FPGMImportance(Importance):
    """Filter pruning via geometric median: a producing row close to the
    other rows of its layer is redundant.  Score = summed Euclidean distance
    of the unit's row to every other row of the same weight; an all-zero
    row scores 0 (it carries nothing, wherever it lies)."""

    def members(self, group):
        return [m for m in super().members(group) if m.role == "out" and m.op in ("conv", "linear", "conv_transpose")]

    def position_scores(self, values, axis):
        rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).astype(np.float64)
        sq = np.square(rows).sum(axis=1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0)
        return np.where(sq > 0, np.sqrt(d2).sum(axis=1), 0.0)

    fallback = True


@register_importance("taylor")
class TaylorImportance(Importance):
    """First-order Taylor over the whole group (group-Fisher style): the
    arrays are ``w * mean(grad)`` on calibration data; a unit's score is
    ``|sum of its slices over every member|``."""

    statistic = "taylor"

    def position_scores(self, values, axis):
        return values.sum(axis=_others(values, axis), dtype=np.float64)

    def finish(self, totals):
        return np.abs(totals)


@register_importance("obd")
class OBDImportance(Importance):
    """Optimal brain damage with the diagonal empirical Fisher: the arrays
    are ``w**2 * mean(grad**2)``; a unit's score sums them over the group."""

    statistic = "fisher"

    def position_scores(self, values, axis):
        return values.sum(axis=_others(values, axis), dtype=np.float64)


@register_importance("activation")
class ActivationImportance(Importance):
    """Mean |output activation| of the producing layers' channels on
    calibration data (arrays: one value per output channel of each
    Conv/Linear weight); units with no producing layer fall back to L2."""

    statistic = "activation"

    def members(self, group):
        return [m for m in super().members(group) if m.role == "out" and m.axis == 0
                and m.op in ("conv", "linear") and m.slot == 1]

    def position_scores(self, values, axis):
        return np.asarray(values, dtype=np.float64).reshape(-1)

    fallback = True


@register_importance("wanda")
class WandaImportance(Importance):
    """Wanda: ``|W| * ||X||`` (weight magnitude times the input channel's
    activation norm) summed over the unit's slices of every Conv/Linear
    member; members without statistics are left out."""

    statistic = "wanda"

    def members(self, group):
        return [m for m in super().members(group) if m.op in ("conv", "linear") and m.slot == 1]

    def position_scores(self, values, axis):
        return np.abs(values).sum(axis=_others(values, axis), dtype=np.float64)

    fallback = True


class StatArrays(dict):
    """Calibration statistics by parameter name, with the raw ``weights``
    (a mapping) for criteria that fall back to magnitude."""

    def __init__(self, stats, weights):
        super().__init__(stats)
        self.weights = weights



@register_importance("random")
class RandomImportance(Importance):
    """Uniform random scores (a baseline); ``seed`` makes it reproducible."""

    def __init__(self, seed: int = 0, reduction: str = "sum"):
        super().__init__(reduction)
        self.seed = seed

    def __call__(self, group, arrays):
        rng = np.random.default_rng(self.seed + group.id)
        return rng.random(len(group.units))
