"""Capture with ``torch.export`` (or a recorded eager forward, see
:mod:`.torch_record`) for models torch.fx cannot trace.

The exported (or recorded) program is an aten-level fx graph whose parameter placeholders
are mapped back to their qualified names through the graph signature.  All
sizes in an exported graph are literals, so every reshape of a channel axis
is treated as static (channels do not cross it) — the safe reading — except
trailing axes a reshape leaves intact (see :func:`_static_axes`).
"""

from __future__ import annotations

import contextlib

import torch

from ..ir import Graph
from .torch_record import RecNode, leaves, record

_NODES = (torch.fx.Node, RecNode)  # exported fx nodes, recorded nodes


aten = torch.ops.aten

_ELEMENTWISE = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "relu": "relu", "relu_": "relu",
    "gelu": "gelu", "silu": "silu", "silu_": "silu", "sigmoid": "sigmoid", "tanh": "tanh",
    "hardswish": "hardswish", "hardswish_": "hardswish", "hardsigmoid": "hardsigmoid",
    "hardtanh": "hardtanh", "hardtanh_": "hardtanh", "dropout": "dropout", "clone": "identity",
    "contiguous": "identity", "alias": "identity", "_to_copy": "identity", "neg": "neg",
    "exp": "exp", "sqrt": "sqrt", "rsqrt": "rsqrt", "pow": "pow", "abs": "abs", "addcmul": "addcmul",
}
_POOL = {"adaptive_avg_pool2d", "max_pool2d", "avg_pool2d", "_adaptive_avg_pool2d",
         "max_pool2d_with_indices", "adaptive_avg_pool1d", "upsample_nearest2d",
         "upsample_bilinear2d"}


def _factor_blocks(src, out):
    """Pair runs of ``src`` and ``out`` axes with equal products, left to right.

    Returns ``[(src_axes, out_axes), ...]`` covering both shapes; size-1 axes
    form blocks of their own where they can.  ``None`` if the shapes do not
    factor into blocks (a zero-sized axis).
    """
    blocks, i, j = [], 0, 0
    while i < len(src) or j < len(out):
        if i < len(src) and src[i] == 1 and (j >= len(out) or out[j] != 1):
            blocks.append(([i], []))
            i += 1
            continue
        if j < len(out) and out[j] == 1 and (i >= len(src) or src[i] != 1):
            blocks.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(out):
            return None
        si, oj, ps, po = [i], [j], src[i], out[j]
        i, j = i + 1, j + 1
        while ps != po:
            if ps < po and i < len(src):
                ps, si, i = ps * src[i], si + [i], i + 1
            elif po < ps and j < len(out):
                po, oj, j = po * out[j], oj + [j], j + 1
            else:
                return None
        blocks.append((si, oj))
    return blocks


def _static_axes(src, out) -> list[bool]:
    """Which output sizes of an exported reshape are taken as fixed literals.

    Export bakes every size in, so the code's intent is unknown; this is the
    reading transformer code follows, and the oracle checks it after apply.
    The shapes are split into blocks of axes with equal products:

    * one axis to one axis: the size follows the tensor;
    * axes merged into one (``[B, T, H, D] -> [B, T, H*D]``, GQA's
      ``[B, KV, rep, T, D] -> [B, KV*rep, T, D]``): the merged size follows;
    * one axis split in several (``[B, T, C] -> [B, T, H, D]``): the first
      output axis follows (``-1`` or a head count apply rewrites), the others
      (``head_dim``) are literals — so labels are unified across them and
      whole heads become the units;
    * anything else: literal.

    The leading axis (batch) is always literal.
    """
    static = [True] * len(out)
    for s_axes, o_axes in _factor_blocks(src, out) or []:
        if not o_axes or (not s_axes and len(o_axes) == 1):
            continue
        if len(o_axes) == 1 or len(s_axes) == 1:
            static[o_axes[0]] = False
    if out:
        static[0] = True
    return static


def _is_square(arg) -> bool:
    """``arg`` is ``pow(x, 2)``: a mean of it with ``keepdim`` is RMSNorm's statistic."""
    return (isinstance(arg, _NODES) and arg.op == "call_function"
            and getattr(arg.target, "_overloadpacket", None) is aten.pow and len(arg.args) > 1 and arg.args[1] == 2)


def _shape(node):
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return [tuple(v.shape) if hasattr(v, "shape") else None for v in val]
    return [tuple(val.shape)] if hasattr(val, "shape") else None


class _ExportTranslator:
    """Walks an exported graph and emits IR nodes."""

    def __init__(self, ep):
        self.ep = ep
        self.graph = Graph()
        self.env: dict = {}
        sig = ep.graph_signature
        self.param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.buffers = set(sig.inputs_to_buffers.values())

    def val(self, a):
        v = self.env.get(a) if isinstance(a, _NODES) else None
        return None if isinstance(v, tuple) else v

    def emit(self, node, op, inputs, attrs=None):
        shapes = _shape(node)
        ir = self.graph.add_node(op, inputs, shapes, name=node.name, attrs=attrs,
                                 source=f"aten {node.target}")
        self.env[node] = tuple(ir.outputs) if len(shapes) > 1 or isinstance(node.meta.get("val"), (tuple, list)) \
            else ir.outputs[0]

    def run(self) -> Graph:
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "output":
                outs = leaves(node.args[0], _NODES, [])
                self.graph.set_outputs([self.env[n] for n in outs if self.val(n) is not None])
            elif node.op == "call_function" and _shape(node):
                self._call(node)
        return self.graph

    def _placeholder(self, node):
        shape = _shape(node)
        if node.name in self.param_of:
            name = self.param_of[node.name]
            self.env[node] = self.graph.add_param(name, shape[0], name in self.buffers)
        elif shape:
            self.env[node] = self.graph.add_input(node.name, shape[0])

    def _call(self, node):
        t = node.target
        if t is __import__("operator").getitem:
            src, idx = node.args
            self.env[node] = self.env[src][idx]
            return
        name = t._overloadpacket.__name__ if hasattr(t, "_overloadpacket") else str(t)
        a = node.args
        v = self.val
        if name in ("conv2d", "conv1d", "convolution"):
            groups = a[8] if name == "convolution" else (a[6] if len(a) > 6 else 1)
            self.emit(node, "conv", [v(a[0]), v(a[1]), v(a[2]) if len(a) > 2 else None], {"groups": groups})
        elif name == "linear":
            self.emit(node, "linear", [v(a[0]), v(a[1]), v(a[2]) if len(a) > 2 else None])
        elif name in ("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional"):
            self.emit(node, "batch_norm", [v(x) for x in a[:5]])
        elif name in ("layer_norm", "rms_norm"):  # rms_norm(x, shape, weight): no bias
            self.emit(node, "layer_norm", [v(a[0]), v(a[2]) if len(a) > 2 else None,
                                           v(a[3]) if len(a) > 3 else None], {"normalized_ndim": len(a[1])})
        elif name in _ELEMENTWISE:
            self.emit(node, _ELEMENTWISE[name], [v(x) for x in a])
        elif name in _POOL:
            self.emit(node, "pool", [v(a[0])], {"axes": list(range(2, len(_shape(a[0])[0])))})
        elif name in ("view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze"):
            self.emit(node, "reshape", [v(a[0])], {"static": _static_axes(_shape(a[0])[0], _shape(node)[0])})
        elif name == "permute":
            self.emit(node, "permute", [v(a[0])], {"perm": list(a[1])})
        elif name == "cat":
            self.emit(node, "cat", [v(x) for x in a[0]], {"axis": a[1] if len(a) > 1 else 0})
        elif name == "mean":
            keep = bool(a[2]) if len(a) > 2 else False
            self.emit(node, "reduce", [v(a[0])], {"axes": list(a[1]), "keepdim": keep,
                                                  "statistic": keep and _is_square(a[0])})
        elif name in _EXTRA:
            _EXTRA[name](self, node)
        else:
            self.emit(node, f"aten:{name}", [v(x) for x in a if isinstance(x, _NODES)])


@contextlib.contextmanager
def _without_cache(model: torch.nn.Module):
    """Hugging Face style ``config.use_cache`` off (its objects are not tensors), restored after."""
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    if cache:
        config.use_cache = False
    try:
        yield
    finally:
        if cache:
            config.use_cache = cache


def capture_export(model: torch.nn.Module, inputs) -> Graph:
    """Export ``model`` on ``inputs`` and translate the aten graph to the IR."""
    from .torch_fx import as_args

    args, kwargs = as_args(inputs)
    with _without_cache(model):
        ep = torch.export.export(model, args, kwargs=kwargs or None, strict=False)
    return _ExportTranslator(ep).run()


def capture_record(model: torch.nn.Module, inputs) -> Graph:
    """Record one eager forward (:mod:`.torch_record`) and translate it like an exported graph."""
    from .torch_fx import as_args

    args, kwargs = as_args(inputs)
    with _without_cache(model):
        recorded = record(model, args, kwargs)
    return _ExportTranslator(recorded).run()


# -- ops of transformer models (aten level) ------------------------------------

def _addmm(tr, node):
    """``addmm(bias, x, W)`` with ``W`` of shape ``[I, O]`` (GPT-2's Conv1D)."""
    bias, x, w = node.args[:3]
    tr.emit(node, "linear", [tr.val(x), tr.val(w), tr.val(bias)], {"weight_out_axis": 1})


def _transpose(tr, node):
    x, a, b = node.args[:3]
    r = len(_shape(x)[0])
    perm = list(range(r))
    perm[a % r], perm[b % r] = perm[b % r], perm[a % r]
    tr.emit(node, "permute", [tr.val(x)], {"perm": perm})


def _embedding(tr, node):
    w, idx = node.args[:2]
    tr.emit(node, "embedding", [tr.val(idx), tr.val(w)])


def _slice(tr, node):
    x = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else 2 ** 62
    step = node.args[4] if len(node.args) > 4 else 1
    size = _shape(x)[0][dim]
    s, e, st = slice(start, end, step).indices(size)
    tr.emit(node, "slice", [tr.val(x)], {"axes": [dim], "starts": [s], "ends": [e], "steps": [st]})


def _expand(tr, node):
    tr.emit(node, "expand", [tr.val(node.args[0])])


def _matmul(tr, node):
    tr.emit(node, "matmul", [tr.val(a) for a in node.args[:2]])


def _softmax(tr, node):
    tr.emit(node, "softmax", [tr.val(node.args[0])], {"dim": node.args[1]})


def _sdpa(tr, node):
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, *, scale, enable_gqa)``."""
    a, kw = node.args, node.kwargs
    mask = a[3] if len(a) > 3 else kw.get("attn_mask")
    scale = a[6] if len(a) > 6 else kw.get("scale")
    gqa = a[7] if len(a) > 7 else kw.get("enable_gqa", False)
    tr.emit(node, "sdpa", [tr.val(x) for x in a[:3]] + [tr.val(mask) if mask is not None else None],
            {"scale_given": scale is not None, "enable_gqa": bool(gqa)})


def _split(tr, node):
    """``split(x, size, dim)`` / ``split_with_sizes`` / ``chunk``: equal pieces are
    read as an even split of the (pruned) width — ``chunk`` or a size attribute
    apply rewrites (GPT-2's ``split_size``); unequal literal sizes are fixed."""
    x = node.args[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    sizes = [s[dim] for s in _shape(node)]
    tr.emit(node, "split", [tr.val(x)], {"axis": dim, "sizes": sizes, "equal": len(set(sizes)) == 1})


def _identity(tr, node):
    tr.emit(node, "identity", [tr.val(node.args[0])])


_EXTRA = {
    "addmm": _addmm, "transpose": _transpose, "t": _transpose, "embedding": _embedding, "slice": _slice,
    "expand": _expand, "matmul": _matmul, "bmm": _matmul, "softmax": _softmax, "_softmax": _softmax,
    "to": _identity, "type_as": _identity, "scaled_dot_product_attention": _sdpa,
    "split": _split, "split_with_sizes": _split, "chunk": _split,
}
