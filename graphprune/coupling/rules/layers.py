"""Rules of the layers that own weights, and of elementwise ops."""

from __future__ import annotations

import numpy as np

from .base import ELEMENTWISE, Rule, add_param_member, channel_ids, fix_axes, others, register, unify_aligned


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


@register(*ELEMENTWISE)
class ElementwiseRule(Rule):
    """Broadcasting elementwise op: aligned labelled axes are unified
    (see :func:`unify_aligned`)."""

    def apply(self, node, st):
        out = node.outputs[0]
        operands = [v for v in node.inputs if v is not None]
        st.set(out, unify_aligned(st, node, operands, out.rank))


