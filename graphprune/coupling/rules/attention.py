"""Rules of fused attention ops and of the ops around them."""

from __future__ import annotations

import numpy as np

from .base import Rule, add_param_member, channel_ids, fix_axes, others, register


@register("mha")
class MultiheadAttentionRule(Rule):
    """An attention module with packed q/k/v rows and an output projection,
    captured as one op: ``nn.MultiheadAttention``, timm ``Attention`` and
    ``WindowAttention``, torchvision ``ShiftedWindowAttention``.

    Inputs: ``q, k, v`` (channels on the last axis), the qkv weight
    ``[3 * heads * head_dim, C]`` and bias, the projection weight
    ``[C_out, heads * head_dim]`` and bias, an optional table with one column
    per head (Swin's relative position bias), then tensors that only steer
    positions (masks).  Attrs: ``num_heads``, ``head_dim``, ``per_head_mask``
    (a mask input has a head axis, so no head can go).

    * Input channels: q, k and v are read by the same packed columns, so
      their channels are unified; every other labelled axis is fixed
      (tokens and windows are mixed).
    * Heads: one produced id per head, marked as a head.  The qkv rows are
      ``[3, heads, head_dim]`` and the projection columns ``[heads,
      head_dim]``, so a unit is a whole head: its q, k, v rows, its
      projection columns and its table column.  ``head_dim`` and the
      attention scale never change, so head groups are exact (the
      frontends only capture modules that read ``head_dim`` from an
      attribute or a stored scale; apply gives torchvision's modules a
      forward that does).
    * Output: the projection produces new channels on the last axis.  An
      attention-weights output keeps its head axis labelled.
    """

    def apply(self, node, st):
        q, k, v, qkv_w, qkv_b, proj_w, proj_b, table, *extra = node.inputs
        why = node.describe()
        heads, hd = int(node.attrs["num_heads"]), int(node.attrs["head_dim"])
        ids = channel_ids(st, q, q.rank - 1, why)
        for x in (q, k, v):
            if x is not q and x is not None:
                st.uf.union_arrays(ids, channel_ids(st, x, x.rank - 1, why))
            if x is not None:
                st.fix_map(others(st.get(x), x.rank - 1), f"{why}: positions mixed")
        for x in extra:
            st.fix_map(st.get(x), f"{why}: attention mask")
        add_param_member(st, qkv_w, 1, "in", ids, node)
        if qkv_w.shape[0] == 3 * heads * hd and proj_w.shape[1] == heads * hd:
            head_ids = st.produce(heads)
            st.mark_heads(head_ids)
            if node.attrs.get("per_head_mask"):
                st.fix(head_ids, f"{why}: the attention mask has one slice per head")
            rows = np.repeat(head_ids, hd)
            add_param_member(st, qkv_w, 0, "out", rows, node, tile=3)
            add_param_member(st, qkv_b, 0, "out", rows, node, tile=3)
            add_param_member(st, proj_w, 1, "in", rows, node)
            add_param_member(st, table, 1, "out", head_ids, node)
        else:
            head_ids = None
            reason = f"{why}: projections are not [3, {heads}, {hd}] rows / [{heads}, {hd}] columns"
            for w, axis, role in ((qkv_w, 0, "out"), (qkv_b, 0, "out"), (proj_w, 1, "in"), (table, 1, "out")):
                if w is not None:
                    fixed = st.uf.fresh(w.shape[axis])
                    st.fix(fixed, reason)
                    add_param_member(st, w, axis, role, fixed, node)
        out_ids = st.produce(proj_w.shape[0])
        add_param_member(st, proj_w, 0, "out", out_ids, node)
        add_param_member(st, proj_b, 0, "out", out_ids, node)
        out = node.outputs[0]
        st.set(out, {(out.rank - 1,): out_ids})
        for w in node.outputs[1:]:  # attention weights: [B, heads, T, S] unless averaged
            st.set(w, {(1,): head_ids} if head_ids is not None and w.rank == 4 and w.shape[1] == heads else {})


@register("swin_attention")
class SwinAttentionRule(Rule):
    """torchvision's ``shifted_window_attention`` function, where the fx
    frontend sees the call (Swin V2; V1 modules are captured whole as ``mha``).

    ``head_dim`` is computed as ``C // num_heads`` from the input width, so
    the input, q/k/v and output widths move together: the embed space is
    viewed as ``[heads, head_dim]`` and unified across heads, a unit is one
    head-dim position in every head, lossy (the scale reads the width).
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
