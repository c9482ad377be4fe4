"""Rules of fused attention ops and of the ops around them."""

from __future__ import annotations

import numpy as np

from .base import Rule, add_param_member, channel_ids, fix_axes, others, register


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


@register("sdpa")
class ScaledDotProductAttentionRule(Rule):
    """``softmax(q k^T * scale + mask) v`` on ``[..., heads, tokens, dim]``.

    * Heads: q, k and v heads are unified one to one; with grouped-query
      attention (``enable_gqa``, ``H = g * H_kv``) query head ``h`` is unified
      with KV head ``h // g``, so a unit is a KV head with all its query
      heads.  Head labels are marked as heads (the ``heads=`` budget).
    * q/k head dims are contracted together: unified, and lossy unless the
      scale is passed explicitly (the default scale reads the width).
    * v's head dim is the output's; token axes and the mask are fixed
      (positions are mixed).
    """

    def apply(self, node, st):
        q, k, v, mask = node.inputs[:4]
        why = node.describe()
        for x in (q, k, v):
            keep = {(x.rank - 3,), (x.rank - 1,)}
            st.fix_map({ax: a for ax, a in st.get(x).items() if ax not in keep}, f"{why}: mixed positions")
        if mask is not None:
            st.fix_map(st.get(mask), f"{why}: attention mask")
        hq, hk, hv = (channel_ids(st, x, x.rank - 3, why) for x in (q, k, v))
        st.uf.union_arrays(hk, hv)
        if len(hq) != len(hk):
            if not node.attrs.get("enable_gqa") or len(hq) % len(hk):
                st.fix(hq, f"{why}: {len(hq)} query heads cannot share {len(hk)} KV heads")
                st.fix(hk, f"{why}: {len(hq)} query heads cannot share {len(hk)} KV heads")
            else:
                st.uf.union_arrays(hq, np.repeat(hk, len(hq) // len(hk)))
        else:
            st.uf.union_arrays(hq, hk)
        st.mark_heads(hq)
        st.mark_heads(hk)
        if (q.rank - 1,) in st.get(q) or (k.rank - 1,) in st.get(k):  # head-dim channels
            dq, dk = channel_ids(st, q, q.rank - 1, why), channel_ids(st, k, k.rank - 1, why)
            st.uf.union_arrays(dq, dk)
            if not node.attrs.get("scale_given"):
                st.mark_lossy(dq)
        out = node.outputs[0]
        lm = {(out.rank - 3,): hq}
        if (v.rank - 1,) in st.get(v):
            lm[(out.rank - 1,)] = st.get(v)[(v.rank - 1,)]
        st.set(out, lm)


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
