"""Rules of ops that move, split, join or reduce positions."""

from __future__ import annotations

import numpy as np

from ..labels import LabelMap, compress, materialise, shift_axes
from .base import Rule, channel_ids, fix_axes, register, unify_aligned


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

    Reducing a labelled axis mixes channels: those channels are fixed —
    except a norm's statistic (``attrs['statistic']``: RMSNorm's mean of
    squares, broadcast back onto the same channels), through which removing
    channels only changes the statistic: lossy, like LayerNorm.
    """

    def apply(self, node, st):
        x = node.inputs[0]
        axes = sorted({a % x.rank for a in node.attrs.get("axes", range(x.rank))})
        keep = node.attrs.get("keepdim", False)
        if node.attrs.get("statistic"):
            for k, arr in st.get(x).items():
                if any(a in axes for a in k):
                    st.mark_lossy(arr)
            rest = {k: v for k, v in st.get(x).items() if not any(a in axes for a in k)}
        else:
            rest = fix_axes(st, st.get(x), axes, f"{node.describe()}: reduces channels")
        lm = {}
        for k, v in rest.items():
            new = k if keep else tuple(a - sum(1 for r in axes if r < a) for a in k)
            lm[new] = v
        st.set(node.outputs[0], lm)


@register("softmax")
class SoftmaxRule(Rule):
    """Softmax over a labelled axis mixes channels: they are fixed.

    ``attrs['dims']`` (ONNX opset < 13 flattens every axis from ``axis`` on)
    overrides ``attrs['dim']``.
    """

    def apply(self, node, st):
        x = node.inputs[0]
        dims = [d % x.rank for d in node.attrs.get("dims") or [node.attrs["dim"]]]
        rest = fix_axes(st, st.get(x), dims, f"{node.describe()}: softmax over channels")
        lm = dict(rest)
        st.set(node.outputs[0], lm)


@register("reshape")
class ReshapeRule(Rule):
    """View, reshape, flatten, (un)squeeze: labels move with the elements.

    Each entry is broadcast over the input shape, reshaped and compressed.
    An output axis whose size is a literal in the model's code
    (``attrs['static'][i]``) cannot shrink: labels are unified across it (a
    channel shuffle's group factor) or, if nothing else in the entry can
    shrink, fixed.  With ``attrs['rewritable']`` (ONNX: constant targets are
    rewritten by apply) an entry spread over several non-static axes shrinks
    along its largest one (the last on ties) and is unified across the others:
    ``C -> [heads, head_dim]`` prunes head-dim positions in every head,
    ``C -> [g, C/g]`` keeps a shuffle's groups.
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
            if len(dyn) > 1 and node.attrs.get("rewritable"):
                dyn = [max(dyn, key=lambda a: (out.shape[a], a))]
                stat = [i for i, a in enumerate(new_axes) if a not in dyn]
            if len(dyn) != 1:
                st.fix(arr, f"{node.describe()}: channel axis has a fixed size in the code")
                continue
            for i in stat:  # unify across literal factors
                first = np.take(lab, [0], axis=i)
                st.uf.union_arrays(first, lab)
            index = tuple(slice(None) if a in dyn else 0 for a in new_axes)
            if tuple(dyn) in lm:  # two entries merged into one axis: neither can follow alone
                st.fix(lm.pop(tuple(dyn)), f"{node.describe()}: two channel axes merged")
                st.fix(arr, f"{node.describe()}: two channel axes merged")
                continue
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
    """Broadcast size-1 axes (new leading axes allowed); labels shift along.

    ``attrs['static'][i]`` marks output axes whose target size cannot be
    rewritten (ONNX ``Expand`` shapes computed at run time): labels there are
    fixed.
    """

    def apply(self, node, st):
        x, out = node.inputs[0], node.outputs[0]
        lm = shift_axes(st.get(x), out.rank - x.rank)
        static = node.attrs.get("static")
        if static:
            lm = fix_axes(st, lm, [i for i, s in enumerate(static) if s],
                          f"{node.describe()}: target size cannot be rewritten")
        st.set(out, lm)


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
    0's.  Unequal literal sizes cannot follow a pruned axis: fixed.  With
    ``attrs['rewritable']`` (ONNX ``Split`` sizes are rewritten by apply) each
    piece simply keeps its own positions.
    """

    def apply(self, node, st):
        x = node.inputs[0]
        axis = node.attrs["axis"] % x.rank
        sizes = list(node.attrs["sizes"])
        lm = st.get(x)
        ent = lm.get((axis,))
        rest = fix_axes(st, {k: a for k, a in lm.items() if k != (axis,)}, [axis],
                        f"{node.describe()}: joint labels on split axis")
        if ent is None or node.attrs.get("rewritable"):
            pass
        elif not (node.attrs.get("equal") and len(set(sizes)) == 1):
            st.fix(ent, f"{node.describe()}: split sizes are literals")
        else:
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




@register("slice")
class SliceRule(Rule):
    """Strided slice with concrete bounds (ONNX ``Slice``).

    ``attrs``: ``axes``, ``starts``, ``ends``, ``steps`` (normalised, within
    the axis), and ``rewritable`` when apply can rewrite the bounds.  A
    labelled axis sliced with step 1 and rewritable bounds keeps the labels
    of the slice; any other cut of a labelled axis fixes it.  A full-range
    slice passes everything through.
    """

    def apply(self, node, st):
        x, out = node.inputs[0], node.outputs[0]
        lm = dict(st.get(x))
        a = node.attrs
        why = f"{node.describe()}: slices a channel axis"
        for axis, s, e, step in zip(a["axes"], a["starts"], a["ends"], a["steps"]):
            axis %= x.rank
            if step == 1 and s == 0 and e >= x.shape[axis]:
                continue
            ent = lm.get((axis,))
            if ent is not None and step == 1 and a.get("rewritable"):
                lm[(axis,)] = ent[s:e]
                continue
            lm = fix_axes(st, lm, [axis], why)
        st.set(out, lm)


@register("shape_read")
class ShapeReadRule(Rule):
    """A tensor computed from other tensors' sizes (``attrs['reads']``: input
    index, axis) and used as data, e.g. an attention scale ``1/sqrt(d)``.
    Pruning a read axis changes the value, so its channels are lossy."""

    def apply(self, node, st):
        for idx, axis in node.attrs["reads"]:
            v = node.inputs[idx]
            for axes, arr in st.get(v).items():
                if axis % v.rank in axes:
                    st.mark_lossy(arr)
        for out in node.outputs:
            st.set(out, {})
