"""Uniform-ratio planning: remove the lowest-scoring units of every group.

Invariants of the result: a group never loses all its units; fixed units are
never removed; the number of kept units is a multiple of ``round_to`` where
that is possible without emptying the group or exceeding the prunable units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..coupling.groups import Group
from .plan import PlanGroup, PlanMember, PruningPlan


def n_to_remove(group: Group, ratio: float, round_to: int = 1) -> int:
    """How many units of ``group`` a uniform ``ratio`` removes."""
    width, free = group.width, group.n_prunable
    if free == 0 or ratio <= 0:
        return 0
    keep = width - int(math.floor(ratio * width))
    if round_to > 1:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    keep = max(keep, width - free, 1)
    return max(0, min(width - keep, free))


def plan_group(group: Group, scores: np.ndarray, n_remove: int) -> PlanGroup | None:
    """Choose the ``n_remove`` lowest-scoring prunable units of ``group``."""
    if n_remove <= 0:
        return None
    order = [i for i in np.argsort(scores, kind="stable") if group.prunable[i]]
    removed = {group.units[i] for i in order[:n_remove]}
    members = []
    for m in group.members:
        keep = tuple(p for p, u in zip(m.indices, m.units) if u not in removed)
        members.append(PlanMember(m.param, m.axis, m.role, keep, tuple(m.indices), m.is_buffer))
    return PlanGroup(group.id, group.kind, group.width, group.width - n_remove, group.lossy, tuple(members))


def _ratio_of(group: Group, ratio: float | Mapping[str, float]) -> float:
    """``ratio`` for a channel group; a mapping gives one ratio per group kind."""
    if isinstance(ratio, Mapping):
        return float(ratio.get(group.kind, 0.0))
    return ratio if group.kind == "channel" else 0.0


def uniform_plan(groups: list[Group], arrays: Mapping[str, np.ndarray], importance,
                 ratio: float | Mapping[str, float], round_to: int = 1, meta=None) -> PruningPlan:
    """Prune every prunable group by its kind's ratio using ``importance`` scores.

    ``ratio``: a float for channel groups (head groups are then kept), or
    ``{"channel": r, "head": h}``.  ``round_to`` applies to channel groups;
    a head group's units are whole heads already.
    """
    planned = []
    for g in groups:
        k = n_to_remove(g, _ratio_of(g, ratio), round_to if g.kind == "channel" else 1)
        if k:
            pg = plan_group(g, importance(g, arrays), k)
            if pg is not None:
                planned.append(pg)
    return PruningPlan(tuple(planned), dict(meta or {}))


def _lamp(s: np.ndarray) -> np.ndarray:
    """LAMP: ``s_i^2 / sum_{s_j >= s_i} s_j^2`` (ties share the larger tail)."""
    sq = np.square(s)
    order = np.argsort(sq, kind="stable")
    tail = np.cumsum(sq[order][::-1])[::-1]
    out = np.empty_like(sq)
    out[order] = sq[order] / np.maximum(tail, 1e-300)
    return out


NORMALIZERS = {
    "none": lambda s: s,
    "mean": lambda s: s / max(float(np.mean(s)), 1e-300),
    "max": lambda s: s / max(float(np.max(s)), 1e-300),
    "sum": lambda s: s / max(float(np.sum(s)), 1e-300),
    "lamp": _lamp,
}


def global_counts(groups: list[Group], scores: dict, fraction: float, round_to: int = 1,
                  normalizer: str = "mean", max_ratio: float = 0.9) -> dict[int, int]:
    """Units to remove per group when one ranking spans all groups.

    Scores are normalised per group (``normalizer``), the lowest ``fraction``
    of all units of prunable groups is taken, no group loses more than
    ``max_ratio`` of its width (nor all of it), and removal counts are
    rounded down so kept widths stay multiples of ``round_to`` where possible.
    """
    norm = NORMALIZERS[normalizer]
    pool, caps, total = [], {}, 0
    for g in groups:
        if not g.n_prunable:
            continue
        total += g.width
        caps[g.id] = min(g.n_prunable, int(math.floor(max_ratio * g.width)), g.width - 1)
        ns = norm(np.asarray(scores[g.id], dtype=np.float64))
        pool += [(float(ns[i]), g.id) for i in range(g.width) if g.prunable[i]]
    pool.sort(key=lambda t: t[0])
    target, counts, taken = int(round(fraction * total)), dict.fromkeys(caps, 0), 0
    for _, gid in pool:
        if taken >= target:
            break
        if counts[gid] < caps[gid]:
            counts[gid] += 1
            taken += 1
    if round_to > 1:
        width = {g.id: g.width for g in groups}
        for gid, k in counts.items():
            keep = width[gid] - k
            rounded = int(math.ceil(keep / round_to)) * round_to
            counts[gid] = width[gid] - rounded if rounded < width[gid] else 0
    return counts


def global_plan(groups: list[Group], arrays: Mapping[str, np.ndarray], importance, fraction: float,
                round_to: int = 1, meta=None, normalizer: str = "mean", max_ratio: float = 0.9,
                kinds: Mapping[str, float] | None = None) -> PruningPlan:
    """One ranking per group kind (see :func:`global_counts`): the globally
    lowest-ranked ``fraction`` of channel units, and ``kinds[kind]`` of the
    units of every other kind (whole heads across all attention layers,
    hidden width), each group keeping at least one unit and at most
    ``max_ratio`` of it removed.  ``round_to`` applies to channels only."""
    shares = {"channel": fraction, **{k: v for k, v in (kinds or {}).items() if k != "channel"}}
    scores, counts = {}, {}
    for kind, share in shares.items():
        members = [g for g in groups if g.kind == kind and g.n_prunable]
        if not members or share <= 0:
            continue
        scores.update({g.id: importance(g, arrays) for g in members})
        counts.update(global_counts(members, scores, share, round_to if kind == "channel" else 1,
                                    normalizer, max_ratio))
    planned = [pg for g in groups if counts.get(g.id)
               for pg in [plan_group(g, scores[g.id], counts[g.id])] if pg is not None]
    return PruningPlan(tuple(planned), dict(meta or {}))
