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


def uniform_plan(groups: list[Group], arrays: Mapping[str, np.ndarray], importance,
                 ratio: float, round_to: int = 1, meta=None) -> PruningPlan:
    """Prune every prunable group by ``ratio`` using ``importance`` scores."""
    planned = []
    for g in groups:
        k = n_to_remove(g, ratio, round_to)
        if k:
            pg = plan_group(g, importance(g, arrays), k)
            if pg is not None:
                planned.append(pg)
    return PruningPlan(tuple(planned), dict(meta or {}))
