"""Walk the IR once with the op rules and turn labels into groups.

A *unit* is a union-find class of channel ids that appears on some parameter
member.  Units that appear on exactly the same set of member axes form a
:class:`Group`: all its members are cut with the same units.  (In DenseNet a
BatchNorm after a concat is a member of several groups, each owning a slice
of its positions.)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ..errors import UnsupportedOpError
from .labels import CouplingState
from .rules import RULES


@dataclass(frozen=True)
class GroupMember:
    """Positions ``indices`` of ``param``'s ``axis``; ``units[i]`` owns ``indices[i]``."""

    param: str
    axis: int
    role: str
    indices: tuple[int, ...]
    units: tuple[int, ...]
    is_buffer: bool = False


@dataclass
class Group:
    """Coupled parameter slices.  ``units`` are ordered; ``prunable[i]`` says
    whether unit ``i`` may be removed, ``reasons`` why some may not."""

    id: int
    kind: str
    units: list[int]
    members: list[GroupMember]
    prunable: list[bool]
    lossy: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return len(self.units)

    @property
    def n_prunable(self) -> int:
        return int(sum(self.prunable))

    def producer(self) -> GroupMember | None:
        for m in self.members:
            if m.role == "out" and not m.is_buffer:
                return m
        return None


@dataclass
class Coupling:
    """Result of :func:`couple`: groups plus what stopped channels."""

    groups: list[Group]
    barriers: list[str]


def run_rules(graph, strict: bool = False, fixed_params=()) -> CouplingState:
    """Apply every node's rule in topological order."""
    st = CouplingState()
    for node in graph.nodes:
        rule = RULES.get(node.op)
        if rule is None:
            msg = f"no coupling rule for op '{node.op}' at {node.describe()}"
            if strict:
                raise UnsupportedOpError(msg)
            st.barriers.append(msg)
            for v in node.inputs:
                st.fix_map(st.get(v), f"barrier: {msg}")
            for out in node.outputs:
                st.set(out, {})
            continue
        rule.apply(node, st)
    for v in graph.outputs:
        st.fix_map(st.get(v), "reaches a graph output")
    fixed_params = set(fixed_params)
    for (param, _axis), m in st.members.items():
        if m.role == "out" and param in fixed_params:
            st.fix(m.labels, f"'{param}' is ignored")
    return st


def build_groups(st: CouplingState) -> list[Group]:
    """Group units by the set of member axes they appear on."""
    uf = st.uf
    fixed_roots: dict[int, str] = {}
    for x in st.fixed:
        fixed_roots.setdefault(uf.find(x), st.fixed_reasons.get(x, "fixed"))
    lossy_roots = {uf.find(x) for x in st.lossy}
    produced_roots = {uf.find(int(x)) for ids in st.produced for x in ids}
    for x in list(positions_ids(st)):
        root = uf.find(x)
        if root not in produced_roots:
            fixed_roots.setdefault(root, "no layer produces these positions")
    positions: dict[int, list[tuple[tuple[str, int], int]]] = defaultdict(list)
    for key, m in st.members.items():
        for pos, lab in enumerate(m.labels):
            positions[uf.find(int(lab))].append((key, pos))
    by_signature: dict[frozenset, list[int]] = defaultdict(list)
    for unit, places in positions.items():
        by_signature[frozenset(k for k, _ in places)].append(unit)
    groups = []
    for units in by_signature.values():
        units.sort(key=lambda u: min(p for _, p in positions[u]))
        groups.append(_make_group(len(groups), units, positions, st, fixed_roots, lossy_roots))
    groups.sort(key=lambda g: _order_key(g, st))
    for i, g in enumerate(groups):
        g.id = i
    return groups


def positions_ids(st: CouplingState):
    """Every raw id that sits on a member."""
    for m in st.members.values():
        yield from (int(x) for x in m.labels)


def _make_group(gid, units, positions, st, fixed_roots, lossy_roots) -> Group:
    per_member: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    for u in units:
        for key, pos in positions[u]:
            per_member[key].append((pos, u))
    members = []
    for key, pairs in per_member.items():
        pairs.sort()
        m = st.members[key]
        members.append(GroupMember(m.param, m.axis, m.role, tuple(p for p, _ in pairs),
                                   tuple(u for _, u in pairs), m.is_buffer))
    members.sort(key=lambda m: (m.role != "out", m.is_buffer))
    prunable = [u not in fixed_roots for u in units]
    reasons = sorted({fixed_roots[u] for u in units if u in fixed_roots})
    lossy = any(u in lossy_roots for u in units)
    return Group(gid, "channel", units, members, prunable, lossy, reasons)


def _order_key(group: Group, st: CouplingState):
    prod = group.producer()
    node = st.members[(prod.param, prod.axis)].node if prod else ""
    return (prod is None, _node_order(st, node), group.members[0].param)


def _node_order(st, name):
    return st.node_index.get(name, 1 << 30)


def couple(graph, strict: bool = False, fixed_params=()) -> Coupling:
    """Find every coupled group of ``graph`` (see module docstring)."""
    st = run_rules(graph, strict, fixed_params)
    st.node_index.update({n.name: i for i, n in enumerate(graph.nodes)})
    return Coupling(build_groups(st), st.barriers)


def unit_positions(group: Group) -> dict[int, list[tuple[GroupMember, int]]]:
    """unit -> [(member, position)] for scoring and slicing."""
    out: dict[int, list] = defaultdict(list)
    for m in group.members:
        for pos, u in zip(m.indices, m.units):
            out[u].append((m, pos))
    return out

