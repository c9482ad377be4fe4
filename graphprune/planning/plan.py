"""The frozen, JSON-serialisable result of planning.

``PlanMember.indices`` are the positions of the parameter axis this group
covers; ``keep`` is the subset of them that stays.  A parameter axis may be
covered by several groups (a BatchNorm after a concat); the positions it
loses are the union over groups of ``indices - keep``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..errors import PlanError


@dataclass(frozen=True)
class PlanMember:
    name: str
    axis: int
    role: str
    keep: tuple[int, ...]
    indices: tuple[int, ...]
    is_buffer: bool = False

    @property
    def removed(self) -> tuple[int, ...]:
        kept = set(self.keep)
        return tuple(i for i in self.indices if i not in kept)


@dataclass(frozen=True)
class PlanGroup:
    id: int
    kind: str
    width: int
    kept_units: int
    lossy: bool
    members: tuple[PlanMember, ...]


@dataclass(frozen=True)
class PruningPlan:
    """What to remove.  Apply it with :func:`graphprune.apply`."""

    groups: tuple[PlanGroup, ...]
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    # -- views -----------------------------------------------------------
    def removals(self) -> dict[tuple[str, int], set[int]]:
        """(param, axis) -> positions removed, merged over groups."""
        out: dict[tuple[str, int], set[int]] = {}
        for g in self.groups:
            for m in g.members:
                out.setdefault((m.name, m.axis), set()).update(m.removed)
        return out

    def subset(self, keep_group) -> PruningPlan:
        """The plan restricted to groups for which ``keep_group(g)`` is true."""
        return PruningPlan(tuple(g for g in self.groups if keep_group(g)), dict(self.meta))

    @property
    def lossy_groups(self) -> list[int]:
        return [g.id for g in self.groups if g.lossy]

    def summary(self) -> str:
        n = len(self.groups)
        w = sum(g.width for g in self.groups)
        k = sum(g.kept_units for g in self.groups)
        return f"PruningPlan({n} groups pruned, {k}/{w} units kept, {len(self.lossy_groups)} lossy)"

    # -- JSON ------------------------------------------------------------
    def to_json(self, indent: int | None = None) -> str:
        return json.dumps({"version": 1, "meta": self.meta,
                           "groups": [asdict(g) for g in self.groups]}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        try:
            data = json.loads(text)
            groups = tuple(
                PlanGroup(g["id"], g["kind"], g["width"], g["kept_units"], g["lossy"],
                          tuple(PlanMember(m["name"], m["axis"], m["role"], tuple(m["keep"]),
                                           tuple(m["indices"]), m.get("is_buffer", False))
                                for m in g["members"]))
                for g in data["groups"])
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"not a graphprune plan: {type(err).__name__}: {err}") from err
        return cls(groups, data.get("meta", {}))
