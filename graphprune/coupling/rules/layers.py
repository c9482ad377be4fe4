"""Rules of the layers that own weights, and of elementwise ops."""

from __future__ import annotations

import numpy as np

from ..labels import shift_axes
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
        _channels_out(node, st, x, out)


def _channels_out(node, st, x, out) -> None:
    """Output of a conv-like op: channel axis 1 carries ``out``; labelled
    spatial axes are fixed (their positions mix), others pass through."""
    rest = fix_axes(st, st.get(x), range(2, x.rank), f"{node.describe()}: labelled spatial axis")
    lm = others(rest, 1)
    lm[(1,)] = out
    st.set(node.outputs[0], lm)


@register("linear")
class LinearRule(Rule):
    """A 2-D weight acting on the last axis; other axes pass through.

    The weight is ``[O, I]`` (PyTorch, ONNX ``Gemm`` with ``transB=1``) or
    ``[I, O]`` when ``attrs['weight_out_axis'] == 1`` (ONNX ``MatMul``).
    """

    def apply(self, node, st):
        x, w, b = (node.inputs + [None, None, None])[:3]
        last = x.rank - 1
        oa = int(node.attrs.get("weight_out_axis", 0))
        xin = channel_ids(st, x, last, node.describe())
        out = st.produce(w.shape[oa])
        add_param_member(st, w, 1 - oa, "in", xin, node)
        add_param_member(st, w, oa, "out", out, node)
        add_param_member(st, b, 0, "out", out, node)
        lm = others(st.get(x), last)
        lm[(node.outputs[0].rank - 1,)] = out
        st.set(node.outputs[0], lm)


@register("batch_norm", "instance_norm")
class BatchNormRule(Rule):
    """Per-channel affine on axis 1: params and running stats follow the channel.

    Instance norm belongs here too: its statistics are per channel, so
    removing one channel leaves the others exact.
    """

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




@register("conv_transpose")
class ConvTransposeRule(Rule):
    """Transposed conv, weight ``[I, O/g, *k]``: axis 0 reads, axis 1 produces.

    Only ``groups == 1`` is pruned; grouped transposed convs pin both sides.
    """

    def apply(self, node, st):
        x, w, b = (node.inputs + [None, None, None])[:3]
        groups = int(node.attrs.get("groups", 1))
        xin = channel_ids(st, x, 1, node.describe())
        if groups == 1:
            out = st.produce(w.shape[1])
            add_param_member(st, w, 0, "in", xin, node)
            add_param_member(st, w, 1, "out", out, node)
            add_param_member(st, b, 0, "out", out, node)
        else:
            st.fix(xin, f"{node.describe()}: grouped transposed conv")
            out = st.uf.fresh(w.shape[1] * groups)
            st.fix(out, f"{node.describe()}: grouped transposed conv")
        _channels_out(node, st, x, out)


@register("group_norm")
class GroupNormRule(Rule):
    """Statistics over groups of channels on axis 1: those channels are fixed."""

    def apply(self, node, st):
        x = node.inputs[0]
        st.set(node.outputs[0], fix_axes(st, st.get(x), [1], f"{node.describe()}: group statistics"))


@register("matmul")
class MatMulRule(Rule):
    """Product of two activations ``[..., M, K] @ [..., K, N]`` (attention).

    The contracted axis is unified across both operands (a removed position
    contributes a zero product); leading axes broadcast as in elementwise
    ops; ``M`` comes from the left operand and ``N`` from the right one.
    Rank-1 operands pin their labels.
    """

    def apply(self, node, st):
        a, b = node.inputs[:2]
        out = node.outputs[0]
        if a.rank < 2 or b.rank < 2:
            for v in (a, b):
                st.fix_map(st.get(v), f"{node.describe()}: vector product")
            st.set(out, {})
            return
        why = node.describe()
        st.uf.union_arrays(channel_ids(st, a, a.rank - 1, why), channel_ids(st, b, b.rank - 2, why))
        batch = [_leading(st, v, why) for v in (a, b)]
        lm = _unify_leading(st, node, batch, out.rank - 2)
        for arr in lm.values():  # channels on batch axes of a matmul: attention heads
            st.mark_heads(arr)
        for v, axis, dst in ((a, a.rank - 2, out.rank - 2), (b, b.rank - 1, out.rank - 1)):
            ent = st.get(v).get((axis,))
            if ent is not None:
                lm[(dst,)] = ent
        st.set(out, lm)


def _leading(st, v, why):
    """Entries of ``v`` on its batch axes (joint entries reaching the matrix axes are fixed)."""
    lm = {}
    for axes, arr in st.get(v).items():
        if all(ax < v.rank - 2 for ax in axes):
            lm[axes] = arr
        elif len(axes) > 1:
            st.fix(arr, f"{why}: joint labels on matrix axes")
    return (v, lm)


def _unify_leading(st, node, batch, rank):
    result = {}
    for v, lm in batch:
        for axes, arr in shift_axes(lm, rank - (v.rank - 2)).items():
            if axes in result:
                st.uf.union_arrays(result[axes], arr)
            else:
                result[axes] = arr
    for v, lm in batch:
        vshape = (1,) * (rank - (v.rank - 2)) + tuple(v.shape[:-2])
        lm2 = shift_axes(lm, rank - (v.rank - 2))
        for axes in list(result):
            if axes not in lm2 and any(vshape[a] > 1 for a in axes):
                st.fix(result.pop(axes), f"{node.describe()}: operand '{v.name}' has no channel identity")
    return result


@register("embedding")
class EmbeddingRule(Rule):
    """Table lookup ``W[ids]`` with ``W`` of shape ``[vocab, dim]``: the table's
    columns produce the channels of the output's last axis.  Those channels
    are the model's hidden (residual-stream) width: marked ``hidden``."""

    def apply(self, node, st):
        ids, w = node.inputs[:2]
        out = node.outputs[0]
        st.fix_map(st.get(ids), f"{node.describe()}: indices")
        lab = st.produce(w.shape[1])
        st.mark_hidden(lab)
        add_param_member(st, w, 1, "out", lab, node)
        st.set(out, {(out.rank - 1,): lab})
