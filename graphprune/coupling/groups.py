"""Walk the IR once with the op rules and turn labels into groups.

A *unit* is a union-find class of channel ids that appears on some parameter
member.  Units that appear on exactly the same set of member axes form a
:class:`Group`: all its members are cut with the same units.  (In DenseNet a
BatchNorm after a concat is a member of several groups, each owning a slice
of its positions.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UnsupportedOpError
from .labels import CouplingState, unique_ids
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
    op: str = ""     # op kind of the declaring node (criteria such as BN scale read it)
    slot: int = -1   # input index of the parameter on that node


@dataclass
class Group:
    """Coupled parameter slices.  ``units`` are ordered; ``prunable[i]`` says
    whether unit ``i`` may be removed, ``reasons`` why some may not.
    ``kind`` is ``"head"`` when the units are whole attention heads (one
    unit spans ``head_dim`` positions of each projection), ``"hidden"`` for
    the residual-stream width that starts at a token embedding, else
    ``"channel"``."""

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
    state: CouplingState | None = None   # labels of every value (budgets, apply)
    graph: object = None                 # the IR the groups were found on
    method: str = ""


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
    """Group units by the set of member axes they appear on.

    Vectorised: every member key gets two random 64-bit codes; a unit's
    signature is the pair of sums of the codes of the members it sits on.
    """
    roots = st.uf.roots()
    keys = list(st.members)
    if not keys:
        return []
    member_units = [roots[st.members[k].labels] for k in keys]
    sizes = [len(u) for u in member_units]
    unit = np.concatenate(member_units)
    key = np.repeat(np.arange(len(keys)), sizes)
    pos = np.concatenate([np.arange(n) for n in sizes])
    uniq, inv = np.unique(unit, return_inverse=True)
    pair = unique_ids(inv.astype(np.int64) * len(keys) + key)
    p_unit, p_key = pair // len(keys), pair % len(keys)
    codes = np.random.default_rng(0).integers(1, 2**62, size=(2, len(keys)), dtype=np.uint64)
    sig = np.zeros((2, len(uniq)), dtype=np.uint64)
    for i in range(2):
        np.add.at(sig[i], p_unit, codes[i][p_key])
    first = np.full(len(uniq), np.iinfo(np.int64).max)
    np.minimum.at(first, inv, pos)
    _, unit_group = np.unique(sig, axis=1, return_inverse=True)
    unit_group = unit_group.ravel()
    status = _unit_status(st, roots, uniq)
    n_groups = int(unit_group.max()) + 1
    unit_sets = np.split(np.argsort(unit_group, kind="stable"), np.cumsum(np.bincount(unit_group))[:-1])
    pair_group = unit_group[p_unit]
    key_sets = np.split(p_key[np.argsort(pair_group, kind="stable")],
                        np.cumsum(np.bincount(pair_group, minlength=n_groups))[:-1])
    group_of = np.full(len(roots), -1, dtype=np.int64)  # root id -> group index
    group_of[uniq] = unit_group
    groups = []
    for gi, (idx, gk) in enumerate(zip(unit_sets, key_sets)):
        idx = idx[np.argsort(first[idx], kind="stable")]
        gkeys = sorted({keys[k] for k in set(gk.tolist())})
        groups.append(_make_group(uniq[idx], gkeys, st, roots, status, group_of == gi))
    groups.sort(key=lambda g: _order_key(g, st))
    for i, g in enumerate(groups):
        g.id = i
    return groups


def _unit_status(st, roots, units) -> dict:
    """Fixed reasons and lossy flags by root id."""
    fixed: dict[int, str] = {}
    for x in sorted(st.fixed):
        fixed.setdefault(int(roots[x]), st.fixed_reasons.get(x, "fixed"))
    produced = set(unique_ids(roots[np.concatenate(st.produced)]).tolist()) if st.produced else set()
    for u in units.tolist():
        if u not in produced:
            fixed.setdefault(u, "no layer produces these positions")
    lossy = set(roots[sorted(st.lossy)].tolist()) if st.lossy else set()
    heads = set(roots[sorted(st.heads)].tolist()) if st.heads else set()
    hidden = set(roots[sorted(st.hidden)].tolist()) if st.hidden else set()
    return {"fixed": fixed, "lossy": lossy, "heads": heads, "hidden": hidden}


def _make_group(units: np.ndarray, keys, st, roots, status, in_group: np.ndarray) -> Group:
    """``in_group[r]``: root id ``r`` is one of ``units``."""
    members = []
    for key in keys:
        m = st.members[key]
        mu = roots[m.labels]
        pos = np.nonzero(in_group[mu])[0]
        members.append(GroupMember(m.param, m.axis, m.role, tuple(pos.tolist()),
                                   tuple(mu[pos].tolist()), m.is_buffer, m.op, m.slot))
    members.sort(key=lambda m: (m.role != "out", m.is_buffer))
    ulist = units.tolist()
    fixed = status["fixed"]
    reasons = sorted({fixed[u] for u in ulist if u in fixed})
    kind = "head" if any(u in status["heads"] for u in ulist) else \
        "hidden" if any(u in status["hidden"] for u in ulist) else "channel"
    return Group(0, kind, ulist, members, [u not in fixed for u in ulist],
                 any(u in status["lossy"] for u in ulist), reasons)


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
    return Coupling(build_groups(st), st.barriers, st, graph)
