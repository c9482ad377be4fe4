"""Forwards for torchvision attention modules that lost whole heads.

``nn.MultiheadAttention`` and torchvision's ``shifted_window_attention``
compute ``head_dim`` as *input width // num_heads*: the attention width is
tied to the embedding width.  Whole-head pruning keeps ``head_dim`` and
shrinks ``num_heads`` while the embedding width follows its own group, so
apply gives such a module one of the subclasses below (``mod.__class__`` is
swapped only when the widths differ; ``isinstance`` still holds, the
``state_dict`` keys and module attributes stay those of the parent).

Invariant: with the widths of the parent (attention width == embedding
width) each forward computes what the parent computes; ``head_dim`` (and so
the scale ``head_dim ** -0.5``) is read from the weights and
``num_heads``, never from the input width.
"""

from __future__ import annotations

import functools

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["HeadPrunedMultiheadAttention", "head_attention", "window_attention", "window_attention_class"]


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def head_attention(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                   num_heads: int, head_dim: int, batch_first: bool = True, key_padding_mask=None,
                   need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                   is_causal: bool = False, dropout: float = 0.0, training: bool = False):
    """``nn.MultiheadAttention``'s computation with ``head_dim`` given instead
    of ``embed_dim // num_heads``; returns ``(output, weights or None)``."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = (t.unsqueeze(0) for t in (query, key, value))
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    b, t, s = query.shape[0], query.shape[1], key.shape[1]
    biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q, k, v = (F.linear(x, w, bias).view(x.shape[0], x.shape[1], num_heads, head_dim).transpose(1, 2)
               for x, w, bias in zip((query, key, value), in_proj_weight.chunk(3), biases))
    mask = _additive(attn_mask, q.dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.view(b, num_heads, t, s)
    pad = _additive(key_padding_mask, q.dtype)
    if pad is not None:
        mask = pad.view(b, 1, 1, s) if mask is None else mask + pad.view(b, 1, 1, s)
    p = dropout if training else 0.0
    weights = None
    if need_weights:
        attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
        weights = (attn if mask is None else attn + mask).softmax(dim=-1)
        out = F.dropout(weights, p=p) @ v if p else weights @ v
        weights = weights.mean(dim=1) if average_attn_weights else weights
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None)
    out = F.linear(out.transpose(1, 2).reshape(b, t, num_heads * head_dim), out_proj_weight, out_proj_bias)
    if not batched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    return (out if batch_first else out.transpose(0, 1)), weights


torch.fx.wrap("head_attention")  # one call in fx traces (its shape checks are control flow)


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose ``in_proj_weight`` is ``[3 * num_heads *
    head_dim, embed_dim]`` and ``out_proj`` reads ``num_heads * head_dim``.

    Arguments and results are the parent's (attention weights averaged over
    the remaining heads).  ``attn_mask`` may be ``(L, S)`` or ``(N *
    num_heads, L, S)`` with the new head count.  ``bias_k``/``bias_v`` and
    ``add_zero_attn`` are not supported (graphprune never prunes them).
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        return head_attention(query, key, value, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight,
                              self.out_proj.bias, self.num_heads, self.head_dim, self.batch_first, key_padding_mask,
                              need_weights, attn_mask, average_attn_weights, is_causal, self.dropout, self.training)


def _shift_mask(x, pad_h: int, pad_w: int, window, shift, num_windows: int) -> torch.Tensor:
    """torchvision's attention mask of shifted windows (``-100`` across regions)."""
    mask = x.new_zeros((pad_h, pad_w))
    hs = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    wss = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    for i, (h0, h1) in enumerate(hs):
        for j, (w0, w1) in enumerate(wss):
            mask[h0:h1, w0:w1] = 3 * i + j
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def window_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, relative_position_bias,
                     window_size: list[int], shift_size: list[int], num_heads: int,
                     attention_dropout: float = 0.0, dropout: float = 0.0, training: bool = False):
    """torchvision's ``shifted_window_attention`` (V1, no logit scale) with
    ``head_dim = rows of qkv_weight / 3 / num_heads`` and the output width of
    ``proj_weight``, instead of both read from the input width."""
    b, height, width, _ = x.shape
    pad_r = (window_size[1] - width % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - height % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, c = x.shape
    shift = [0 if window_size[i] >= (ph, pw)[i] else shift_size[i] for i in range(2)]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nw = (ph // window_size[0]) * (pw // window_size[1])
    x = x.view(b, ph // window_size[0], window_size[0], pw // window_size[1], window_size[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * nw, window_size[0] * window_size[1], c)
    hd = qkv_weight.shape[0] // 3 // num_heads
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(x.size(0), x.size(1), 3, num_heads, hd).permute(2, 0, 3, 1, 4)
    attn = (qkv[0] * hd ** -0.5).matmul(qkv[1].transpose(-2, -1)) + relative_position_bias
    if sum(shift) > 0:
        attn = attn.view(x.size(0) // nw, nw, num_heads, x.size(1), x.size(1))
        attn = attn + _shift_mask(x, ph, pw, window_size, shift, nw).unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = attn.matmul(qkv[2]).transpose(1, 2).reshape(x.size(0), x.size(1), num_heads * hd)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    co = x.size(-1)
    x = x.view(b, ph // window_size[0], pw // window_size[1], window_size[0], window_size[1], co)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, co)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


torch.fx.wrap("window_attention")  # one call in fx traces, like torchvision's own function


class _WindowHeads:
    """Mixin: torchvision ``ShiftedWindowAttention.forward`` through :func:`window_attention`."""

    def forward(self, x):
        return window_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias,
                                self.get_relative_position_bias(), self.window_size, self.shift_size,
                                self.num_heads, self.attention_dropout, self.dropout, self.training)


@functools.cache
def window_attention_class() -> type:
    """``HeadPrunedShiftedWindowAttention``, made on first use (torchvision is optional)."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    cls = type("HeadPrunedShiftedWindowAttention", (_WindowHeads, ShiftedWindowAttention),
               {"__module__": __name__, "__doc__": "torchvision ``ShiftedWindowAttention`` after head pruning."})
    return cls


def __getattr__(name: str):  # lets pickle find the class made on first use
    if name == "HeadPrunedShiftedWindowAttention":
        return window_attention_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
