"""Coupling rules: one class per op kind, in one registry.

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

from .labels import CouplingState, LabelMap, compress, materialise, shift_axes

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
    st.add_member(value.param.name, axis, role, lab, value.param.is_buffer, node.name)


def fix_axes(st, lmap: LabelMap, axes, reason) -> LabelMap:
    """Fix entries touching ``axes``; return the untouched ones."""
    kept = {}
    for k, v in lmap.items():
        if any(a in axes for a in k):
            st.fix(v, reason)
        else:
            kept[k] = v
    return kept


# -- rules -----------------------------------------------------------------

@register("conv")
class ConvRule(Rule):
    """Weight ``[O, I/g, *k]``: rows produce a new space, columns read axis 1.

    Grouped conv (``g > 1``) is pruned by whole groups: the input channels of
    group ``i`` and its output channels form one unit, so ``groups`` shrinks
    and the per-group widths stay.  Depthwise conv is the case ``I/g == 1``.
    """

    def apply(self, node, st):
        x, w, b = (node.inputs + [None, None, None])[:3]
        groups = int(node.attrs.get("groups", 1))
        out_c = w.shape[0]
        xin = channel_ids(st, x, 1, node.describe())
        out = st.produce(out_c)
        if groups == 1:
            add_param_member(st, w, 1, "in", xin, node)
        else:
            blocks = np.concatenate([xin.reshape(groups, -1), out.reshape(groups, -1)], axis=1)
            st.uf.union_arrays(blocks[:, :1], blocks)
        add_param_member(st, w, 0, "out", out, node)
        add_param_member(st, b, 0, "out", out, node)
        rest = fix_axes(st, st.get(x), range(2, x.rank), f"{node.describe()}: labelled spatial axis")
        lm = others(rest, 1)
        lm[(1,)] = out
        st.set(node.outputs[0], lm)


@register("linear")
class LinearRule(Rule):
    """Weight ``[O, I]`` acting on the last axis; other axes pass through."""

    def apply(self, node, st):
        x, w, b = (node.inputs + [None, None, None])[:3]
        last = x.rank - 1
        xin = channel_ids(st, x, last, node.describe())
        out = st.produce(w.shape[0])
        add_param_member(st, w, 1, "in", xin, node)
        add_param_member(st, w, 0, "out", out, node)
        add_param_member(st, b, 0, "out", out, node)
        lm = others(st.get(x), last)
        lm[(node.outputs[0].rank - 1,)] = out
        st.set(node.outputs[0], lm)


@register("batch_norm")
class BatchNormRule(Rule):
    """Per-channel affine on axis 1: params and running stats follow the channel."""

    def apply(self, node, st):
        x = node.inputs[0]
        ids = channel_ids(st, x, 1, node.describe())
        for v in node.inputs[1:]:
            add_param_member(st, v, 0, "out", ids, node)
        lm = dict(st.get(x))
        lm[(1,)] = ids
        st.set(node.outputs[0], lm)


@register("layer_norm")
class LayerNormRule(Rule):
    """Normalises the last axis: affine follows the channel, statistics mix.

    Removing a channel changes the mean and variance of the others, so every
    channel here is marked *lossy*: pruning it is valid but not exact.
    """

    def apply(self, node, st):
        x = node.inputs[0]
        nd = int(node.attrs.get("normalized_ndim", 1))
        if nd != 1:
            rest = fix_axes(st, st.get(x), range(x.rank - nd, x.rank), f"{node.describe()}: multi-axis norm")
            st.set(node.outputs[0], rest)
            return
        ids = channel_ids(st, x, x.rank - 1, node.describe())
        for v in node.inputs[1:]:
            add_param_member(st, v, 0, "out", ids, node)
        st.mark_lossy(ids)
        lm = dict(st.get(x))
        lm[(x.rank - 1,)] = ids
        st.set(node.outputs[0], lm)


ELEMENTWISE = (
    "add", "sub", "mul", "div", "relu", "relu6", "silu", "gelu", "sigmoid", "tanh",
    "hardswish", "hardsigmoid", "leaky_relu", "elu", "mish", "identity", "dropout",
    "stochastic_depth", "neg", "abs", "exp", "sqrt", "rsqrt", "pow", "clamp", "hardtanh",
    "softplus", "erf",
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


@register(*ELEMENTWISE)
class ElementwiseRule(Rule):
    """Broadcasting elementwise op: aligned labelled axes are unified
    (see :func:`unify_aligned`)."""

    def apply(self, node, st):
        out = node.outputs[0]
        operands = [v for v in node.inputs if v is not None]
        st.set(out, unify_aligned(st, node, operands, out.rank))


@register("pool", "spatial")
class SpatialRule(Rule):
    """Ops that move or resize positions along ``attrs['axes']`` only.

    Pooling, interpolation, padding and rolls: entries on the listed axes
    are fixed (their positions are mixed), all others pass through.
    """

    def apply(self, node, st):
        x = node.inputs[0]
        axes = [a % x.rank for a in node.attrs.get("axes", range(2, x.rank))]
        rest = fix_axes(st, st.get(x), axes, f"{node.describe()}: positions mixed")
        for out in node.outputs:
            st.set(out, rest if out.rank == x.rank else {})


@register("permute")
class PermuteRule(Rule):
    """Output axis ``i`` is input axis ``perm[i]``."""

    def apply(self, node, st):
        perm = [p % node.inputs[0].rank for p in node.attrs["perm"]]
        inv = {p: i for i, p in enumerate(perm)}
        lm = {}
        for axes, arr in st.get(node.inputs[0]).items():
            new = [inv[a] for a in axes]
            order = np.argsort(new)
            lm[tuple(sorted(new))] = np.transpose(arr, order)
        st.set(node.outputs[0], lm)


@register("reduce")
class ReduceRule(Rule):
    """Reductions (mean, sum, max) over ``attrs['axes']``.

    Reducing a labelled axis mixes channels: those channels are fixed.
    """

    def apply(self, node, st):
        x = node.inputs[0]
        axes = sorted({a % x.rank for a in node.attrs.get("axes", range(x.rank))})
        keep = node.attrs.get("keepdim", False)
        rest = fix_axes(st, st.get(x), axes, f"{node.describe()}: reduces channels")
        lm = {}
        for k, v in rest.items():
            new = k if keep else tuple(a - sum(1 for r in axes if r < a) for a in k)
            lm[new] = v
        st.set(node.outputs[0], lm)


@register("softmax")
class SoftmaxRule(Rule):
    """Softmax over a labelled axis mixes channels: they are fixed."""

    def apply(self, node, st):
        x = node.inputs[0]
        rest = fix_axes(st, st.get(x), [node.attrs["dim"] % x.rank], f"{node.describe()}: softmax over channels")
        lm = dict(rest)
        st.set(node.outputs[0], lm)


@register("reshape")
class ReshapeRule(Rule):
    """View, reshape, flatten, (un)squeeze: labels move with the elements.

    Each entry is broadcast over the input shape, reshaped and compressed.
    An output axis whose size is a literal in the model's code
    (``attrs['static'][i]``) cannot shrink: labels are unified across it (a
    channel shuffle's group factor) or, if nothing else in the entry can
    shrink, fixed.
    """

    def apply(self, node, st):
        x, out = node.inputs[0], node.outputs[0]
        static = node.attrs.get("static") or [False] * out.rank
        lm: LabelMap = {}
        for axes, arr in st.get(x).items():
            full = materialise(axes, arr, x.shape).reshape(out.shape)
            new_axes, lab = compress(full, st.uf)
            if not new_axes:
                st.uf.union_arrays(lab.ravel()[:1], full)
                continue
            stat = [i for i, a in enumerate(new_axes) if static[a]]
            dyn = [a for a in new_axes if not static[a]]
            if len(dyn) != 1:
                st.fix(arr, f"{node.describe()}: channel axis has a fixed size in the code")
                continue
            for i in stat:  # unify across literal factors
                first = np.take(lab, [0], axis=i)
                st.uf.union_arrays(first, lab)
            index = tuple(slice(None) if a in dyn else 0 for a in new_axes)
            lm[tuple(dyn)] = np.ascontiguousarray(lab[index])
        self._tie_sources(node, st, lm)
        st.set(out, lm)

    @staticmethod
    def _tie_sources(node, st, lm: LabelMap) -> None:
        """An output size read from a tensor's axis keeps that axis's width.

        If the output axis carries the same channels (a permutation, as in a
        channel shuffle) the widths agree after any pruning; otherwise the two
        axes are unified position by position, or fixed if that is impossible.
        """
        why = f"{node.describe()}: size read from another tensor's shape"
        for axis, src in enumerate(node.attrs.get("sources") or []):
            if src is None:
                continue
            other, oaxis = node.inputs[src[0]], src[1] % node.inputs[src[0]].rank
            ent = lm.get((axis,))
            src_lab = st.get(other).get((oaxis,))
            if ent is not None and src_lab is not None and _same_classes(st, ent, src_lab):
                continue
            if ent is None and not any(oaxis in k for k in st.get(other)):
                continue
            if ent is not None and len(ent) == other.shape[oaxis]:
                st.uf.union_arrays(ent, channel_ids(st, other, oaxis, why))
                continue
            for axes in [k for k in lm if axis in k]:
                st.fix(lm.pop(axes), why)
            src_ent = [a for k, a in st.get(other).items() if oaxis in k]
            for a in src_ent:
                st.fix(a, why)


def _same_classes(st, a: np.ndarray, b: np.ndarray) -> bool:
    return len(a) == len(b) and np.array_equal(np.sort(st.uf.canonical(a)), np.sort(st.uf.canonical(b)))


@register("expand")
class ExpandRule(Rule):
    """Broadcast size-1 axes (new leading axes allowed); labels shift along."""

    def apply(self, node, st):
        x, out = node.inputs[0], node.outputs[0]
        st.set(out, shift_axes(st.get(x), out.rank - x.rank))


@register("cat")
class ConcatRule(Rule):
    """Concatenation: the cat axis is the ordered sum of the input spaces,
    other labelled axes are unified across inputs (see :func:`unify_aligned`)."""

    def apply(self, node, st):
        out = node.outputs[0]
        axis = node.attrs["axis"] % out.rank
        ins = [v for v in node.inputs if v is not None]
        lm = unify_aligned(st, node, ins, out.rank, skip_axis=axis)
        parts, any_lab = [], False
        for v in ins:
            vlm = st.get(v)
            fix_axes(st, {k: a for k, a in vlm.items() if k != (axis,)}, [axis],
                     f"{node.describe()}: joint labels on cat axis")
            ent = vlm.get((axis,))
            if ent is None:
                ent = st.uf.fresh(v.shape[axis])
                st.fix(ent, f"{node.describe()}: concatenated input '{v.name}' has no channels to shrink")
            else:
                any_lab = True
            parts.append(ent)
        if any_lab:
            lm[(axis,)] = np.concatenate(parts)
        st.set(out, lm)


@register("split")
class SplitRule(Rule):
    """chunk / split along ``attrs['axis']`` into ``attrs['sizes']``.

    After pruning, an equal split cuts the *new* width evenly, so every chunk
    must keep the same positions: chunk ``k``'s labels are unified with chunk
    0's.  Unequal literal sizes cannot follow a pruned axis: fixed.
    """

    def apply(self, node, st):
        x = node.inputs[0]
        axis = node.attrs["axis"] % x.rank
        sizes = list(node.attrs["sizes"])
        lm = st.get(x)
        ent = lm.get((axis,))
        rest = fix_axes(st, {k: a for k, a in lm.items() if k != (axis,)}, [axis],
                        f"{node.describe()}: joint labels on split axis")
        if ent is not None and not (node.attrs.get("equal") and len(set(sizes)) == 1):
            st.fix(ent, f"{node.describe()}: split sizes are literals")
        elif ent is not None:
            blocks = ent.reshape(len(sizes), sizes[0])
            st.uf.union_arrays(blocks[:1], blocks)
        start = 0
        for out, n in zip(node.outputs, sizes):
            olm = dict(rest)
            if ent is not None:
                olm[(axis,)] = ent[start:start + n]
            start += n
            st.set(out, olm)


@register("index")
class IndexRule(Rule):
    """Basic indexing ``x[...]`` with ints, slices, ``None`` and ``...``.

    ``attrs['index']`` is a normalised tuple: ``("int",)``, ``("full",)``,
    ``("slice",)`` (a partial slice), ``("new",)``.  Labelled axes may only be
    taken whole.
    """

    def apply(self, node, st):
        x = node.inputs[0]
        spec = list(node.attrs["index"])
        n_real = sum(1 for s in spec if s != "new" and s != "ellipsis")
        if "ellipsis" in spec:
            i = spec.index("ellipsis")
            spec[i:i + 1] = ["full"] * (x.rank - n_real)
        spec += ["full"] * (x.rank - sum(1 for s in spec if s != "new"))
        mapping, src, dst = {}, 0, 0
        touched = []
        for s in spec:
            if s == "new":
                dst += 1
                continue
            if s == "full":
                mapping[src] = dst
                dst += 1
            elif s == "slice":
                mapping[src] = dst
                touched.append(src)
                dst += 1
            else:  # int
                touched.append(src)
            src += 1
        rest = fix_axes(st, st.get(x), touched, f"{node.describe()}: indexes a channel axis")
        st.set(node.outputs[0], {tuple(mapping[a] for a in k): v for k, v in rest.items()})


@register("mha")
class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention`` with one packed ``in_proj``.

    Its embed dim is the input width, the q/k/v width and the output width
    at once, and ``head_dim = embed_dim / num_heads``.  The embed space is
    viewed as ``[heads, head_dim]`` and unified across heads, so a unit is
    one head-dim position in every head; q, k, v rows and ``out_proj``
    follow the input channel.  The softmax scale depends on ``head_dim``,
    so these channels are lossy.
    """

    def apply(self, node, st):
        q = node.inputs[0]
        heads = int(node.attrs["num_heads"])
        ids = channel_ids(st, q, q.rank - 1, node.describe())
        for kv in node.inputs[1:3]:
            if kv is not None and kv is not q:
                st.uf.union_arrays(ids, channel_ids(st, kv, kv.rank - 1, node.describe()))
        _attention_members(node, st, ids, heads)
        lm = others(st.get(q), q.rank - 1)
        lm[(q.rank - 1,)] = ids
        st.set(node.outputs[0], lm)
        for extra in node.outputs[1:]:
            st.set(extra, {})


@register("swin_attention")
class SwinAttentionRule(Rule):
    """torchvision's ``shifted_window_attention``: same structure as MHA.

    ``head_dim`` is computed as ``C // num_heads`` from the input width, so
    the input, q/k/v and output widths move together.
    """

    def apply(self, node, st):
        x = node.inputs[0]
        heads = int(node.attrs["num_heads"])
        ids = channel_ids(st, x, x.rank - 1, node.describe())
        _attention_members(node, st, ids, heads)
        st.fix_map(st.get(node.inputs[7]), f"{node.describe()}: relative position bias")
        lm = others(st.get(x), x.rank - 1)
        lm[(x.rank - 1,)] = ids
        st.set(node.outputs[0], lm)


def _attention_members(node, st, ids, heads):
    """Members shared by the packed-qkv attention rules (inputs 3..6)."""
    grid = ids.reshape(heads, -1)
    st.uf.union_arrays(grid[:1], grid)
    qkv_w, qkv_b, proj_w, proj_b = node.inputs[3:7]
    add_param_member(st, qkv_w, 0, "out", ids, node, tile=3)
    add_param_member(st, qkv_w, 1, "in", ids, node)
    add_param_member(st, qkv_b, 0, "out", ids, node, tile=3)
    add_param_member(st, proj_w, 1, "in", ids, node)
    add_param_member(st, proj_w, 0, "out", ids, node)
    add_param_member(st, proj_b, 0, "out", ids, node)
    if node.attrs.get("scale_depends_on_width", True):
        st.mark_lossy(ids)


@register("space_to_depth")
class SpaceToDepthRule(Rule):
    """Pad and gather ``copies`` spatial phases into the channel axis
    (Swin's patch merging): the output channel axis is the input's labels
    repeated ``copies`` times; positions on the spatial axes are mixed."""

    def apply(self, node, st):
        x = node.inputs[0]
        axis = node.attrs["axis"] % x.rank
        ids = channel_ids(st, x, axis, node.describe())
        rest = fix_axes(st, others(st.get(x), axis), node.attrs["spatial"], f"{node.describe()}: positions mixed")
        rest[(axis,)] = np.tile(ids, node.attrs["copies"])
        st.set(node.outputs[0], rest)


@register("relative_position_bias")
class OpaqueConstantRule(Rule):
    """Ops that build a constant-like tensor from tables that are never
    pruned (Swin's relative position bias, indexed per head): inputs are
    fixed, outputs are free."""

    def apply(self, node, st):
        for v in node.inputs:
            st.fix_map(st.get(v), f"{node.describe()}: read by an op that cannot shrink")
        for out in node.outputs:
            st.set(out, {})
