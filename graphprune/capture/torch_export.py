"""Fallback capture with ``torch.export`` for models torch.fx cannot trace.

The exported program is an aten-level fx graph whose parameter placeholders
are mapped back to their qualified names through the graph signature.  All
sizes in an exported graph are literals, so every reshape of a channel axis
is treated as static (channels do not cross it) — the safe reading.
"""

from __future__ import annotations

import torch

from ..ir import Graph

aten = torch.ops.aten

_ELEMENTWISE = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "relu": "relu", "relu_": "relu",
    "gelu": "gelu", "silu": "silu", "silu_": "silu", "sigmoid": "sigmoid", "tanh": "tanh",
    "hardswish": "hardswish", "hardswish_": "hardswish", "hardsigmoid": "hardsigmoid",
    "hardtanh": "hardtanh", "hardtanh_": "hardtanh", "dropout": "dropout", "clone": "identity",
    "contiguous": "identity", "alias": "identity", "_to_copy": "identity", "neg": "neg",
    "exp": "exp", "sqrt": "sqrt", "rsqrt": "rsqrt", "pow": "pow", "abs": "abs",
}
_POOL = {"adaptive_avg_pool2d", "max_pool2d", "avg_pool2d", "_adaptive_avg_pool2d",
         "max_pool2d_with_indices", "adaptive_avg_pool1d", "upsample_nearest2d",
         "upsample_bilinear2d"}


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
        v = self.env.get(a) if isinstance(a, torch.fx.Node) else None
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
                outs: list = []
                torch.fx.node.map_arg(node.args[0], outs.append)
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
        elif name == "layer_norm":
            self.emit(node, "layer_norm", [v(a[0]), v(a[2]) if len(a) > 2 else None,
                                           v(a[3]) if len(a) > 3 else None], {"normalized_ndim": len(a[1])})
        elif name in _ELEMENTWISE:
            self.emit(node, _ELEMENTWISE[name], [v(x) for x in a])
        elif name in _POOL:
            self.emit(node, "pool", [v(a[0])], {"axes": list(range(2, len(_shape(a[0])[0])))})
        elif name in ("view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze"):
            static = [True] * len(_shape(node)[0])
            self.emit(node, "reshape", [v(a[0])], {"static": static})
        elif name == "permute":
            self.emit(node, "permute", [v(a[0])], {"perm": list(a[1])})
        elif name == "cat":
            self.emit(node, "cat", [v(x) for x in a[0]], {"axis": a[1] if len(a) > 1 else 0})
        elif name == "mean":
            self.emit(node, "reduce", [v(a[0])], {"axes": list(a[1]), "keepdim": bool(a[2]) if len(a) > 2 else False})
        else:
            self.emit(node, f"aten:{name}", [v(x) for x in a if isinstance(x, torch.fx.Node)])


def capture_export(model: torch.nn.Module, inputs) -> Graph:
    """Export ``model`` on ``inputs`` and translate the aten graph to the IR."""
    from .torch_fx import as_args

    args, kwargs = as_args(inputs)
    ep = torch.export.export(model, args, kwargs=kwargs or None, strict=False)
    return _ExportTranslator(ep).run()
