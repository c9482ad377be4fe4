"""New widths of value axes once a plan's units are gone (framework-free).

A plan names removed *positions* of parameter axes; through the member
labels these become removed *units* (union-find roots).  Every value axis
then keeps the positions whose labels include a surviving unit; for joint
entries (a channel axis split as ``[heads, head_dim]``) a position along one
axis survives if any label in its slice does, which is exact because the
rules unify labels across the axes that cannot shrink.
"""

from __future__ import annotations

import numpy as np

from ..errors import PlanError
from .labels import axis_entry, unique_ids


def removed_units(st, plan) -> np.ndarray:
    """Sorted roots of every unit ``plan`` removes (:class:`PlanError` if it
    cuts a parameter axis that carries no channel labels here)."""
    roots = st.uf.roots()
    out = []
    for (name, axis), removed in plan.removals().items():
        member = st.members.get((name, axis))
        if member is None:
            raise PlanError(f"plan cuts axis {axis} of '{name}', which is not a channel axis of this model")
        if removed:
            if max(removed) >= len(member.labels):
                raise PlanError(f"plan does not fit '{name}' (axis {axis} has {len(member.labels)} positions)")
            out.append(roots[member.labels[sorted(removed)]])
    return unique_ids(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


class NewWidths:
    """New size of every value axis and parameter axis without ``removed`` units."""

    def __init__(self, st, removed: np.ndarray):
        self.st = st
        self.roots = st.uf.roots()
        self.removed = removed

    def kept(self, value, axis: int) -> np.ndarray:
        """Boolean mask over ``value``'s ``axis``: which positions stay."""
        if value.param is not None:
            member = self.st.members.get((value.param.name, axis))
            if member is None:
                return np.ones(value.shape[axis], dtype=bool)
            return ~np.isin(self.roots[member.labels], self.removed)
        ent = axis_entry(self.st.labels.get(id(value), {}), axis)
        if ent is None:
            return np.ones(value.shape[axis], dtype=bool)
        axes, arr = ent
        alive = ~np.isin(self.roots[arr], self.removed)
        other = tuple(i for i in range(arr.ndim) if axes[i] != axis)
        return alive.any(axis=other) if other else alive

    def size(self, value, axis: int) -> int:
        return int(self.kept(value, axis).sum())

    def shape(self, value) -> tuple[int, ...]:
        return tuple(self.size(value, a) for a in range(len(value.shape or ())))
