"""Registry and shared helpers of the coupling rules.

A rule reads the labels of a node's inputs from the :class:`CouplingState`,
unifies what must be cut together, records parameter members, and sets the
labels of the node's outputs.  An op kind without a rule is a *barrier*
(see :func:`graphprune.coupling.groups.couple`); nothing is ever assumed to be
elementwise.

Layout conventions of the IR: ``conv`` and ``batch_norm`` have channels on
axis 1; ``linear`` and ``layer_norm`` act on the last axis.
"""

from __future__ import annotations

import numpy as np

from ..labels import CouplingState, LabelMap, shift_axes

RULES: dict[str, Rule] = {}


def register(*kinds: str):
    """Class decorator: register one rule instance under ``kinds``."""

    def deco(cls):
        inst = cls()
        for k in kinds:
            if k in RULES:
                raise ValueError(f"op kind '{k}' already has a rule")
            RULES[k] = inst
        cls.kinds = kinds
        return cls

    return deco


def list_rules() -> list[str]:
    return sorted(RULES)


class Rule:
    """Base class; subclasses implement :meth:`apply`."""

    kinds: tuple[str, ...] = ()

    def apply(self, node, st: CouplingState) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# -- helpers ---------------------------------------------------------------

def channel_ids(st: CouplingState, value, axis: int, why: str) -> np.ndarray:
    """1-D labels of ``value``'s ``axis``; fresh *fixed* ids if it has none.

    An axis that is part of a joint entry cannot be read as plain channels:
    that entry is fixed and fresh fixed ids are returned.
    """
    axis = axis % value.rank
    lmap = st.get(value)
    for axes, arr in lmap.items():
        if axes == (axis,):
            return arr
        if axis in axes:
            st.fix(arr, f"{why}: channels split across axes {axes}")
    ids = st.uf.fresh(value.shape[axis])
    st.fix(ids, f"{why}: input channels have no producer that can shrink")
    return ids


def others(lmap: LabelMap, axis: int) -> LabelMap:
    """Entries of ``lmap`` that do not touch ``axis``."""
    return {k: v for k, v in lmap.items() if axis not in k}


def add_param_member(st, value, axis, role, labels, node, tile: int = 1):
    if value is None or value.param is None:
        return
    lab = np.tile(labels, tile) if tile > 1 else labels
    slot = next((i for i, v in enumerate(node.inputs) if v is value), -1)
    st.add_member(value.param.name, axis, role, lab, value.param.is_buffer, node.name, node.op, slot)


def fix_axes(st, lmap: LabelMap, axes, reason) -> LabelMap:
    """Fix entries touching ``axes``; return the untouched ones."""
    kept = {}
    for k, v in lmap.items():
        if any(a in axes for a in k):
            st.fix(v, reason)
        else:
            kept[k] = v
    return kept


ELEMENTWISE = (
    "add", "sub", "mul", "div", "relu", "relu6", "silu", "gelu", "sigmoid", "tanh",
    "hardswish", "hardsigmoid", "leaky_relu", "elu", "mish", "identity", "dropout",
    "stochastic_depth", "neg", "abs", "exp", "sqrt", "rsqrt", "pow", "clamp", "hardtanh",
    "softplus", "erf", "log", "reciprocal", "where", "max", "min", "prelu", "floor", "ceil",
    "round", "sign", "sin", "cos", "addcmul",
)


def unify_aligned(st, node, operands, rank: int, skip_axis: int | None = None) -> LabelMap:
    """Unify the labelled axes of right-aligned ``operands`` (numpy broadcasting).

    Returns the output's entries.  An operand that varies along a labelled
    axis without labels of its own (a constant tensor, a graph input) pins
    those channels: they are fixed.  Entries with overlapping but different
    axes are fixed too.  ``skip_axis`` (concat's axis) is left out.
    """
    why = f"{node.describe()}: operands split channels differently"
    maps = []
    for v in operands:
        lm = shift_axes(st.get(v), rank - v.rank)
        if skip_axis is not None:
            lm = {k: a for k, a in lm.items() if skip_axis not in k}
        maps.append((v, lm))
    result: LabelMap = {}
    claimed: dict[int, tuple[int, ...]] = {}
    for _, lm in maps:
        for axes, arr in lm.items():
            if axes in result:
                st.uf.union_arrays(result[axes], arr)
            elif any(a in claimed for a in axes):
                st.fix(arr, why)
                for a in axes:
                    if a in claimed and claimed[a] in result:
                        st.fix(result.pop(claimed[a]), why)
            else:
                result[axes] = arr
                claimed.update({a: axes for a in axes})
    for v, lm in maps:
        vshape = (1,) * (rank - v.rank) + tuple(v.shape)
        for axes in list(result):
            if axes not in lm and any(vshape[a] > 1 for a in axes):
                st.fix(result[axes], f"{node.describe()}: operand '{v.name}' has no channel identity")
    return result


