"""Cost of an IR graph: multiply-accumulates of the weight layers and
activation products, from the shapes recorded at capture (framework-free)."""

from __future__ import annotations

import math


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape else 1


def _shape_of(value):
    return value.shape


def node_macs(node, shape=_shape_of) -> int:
    """MACs of one node (0 for ops that do no multiply-accumulate work).

    ``shape(value)`` gives the shapes to count with (default: the captured
    ones; a budget passes the shapes after a plan).
    """
    if not node.outputs or node.outputs[0].shape is None:
        return 0
    out = shape(node.outputs[0])
    if node.op == "conv":
        return _numel(out) * _numel(shape(node.inputs[1])[1:])
    if node.op == "conv_transpose":
        return _numel(shape(node.inputs[0])) * _numel(shape(node.inputs[1])[1:])
    if node.op == "linear":
        return _numel(out) * shape(node.inputs[0])[-1]
    if node.op == "matmul":
        return _numel(out) * shape(node.inputs[0])[-1]
    return 0


def graph_macs(graph, shape=_shape_of) -> int:
    return sum(node_macs(n, shape) for n in graph.nodes)


def graph_params(graph, shape=_shape_of) -> int:
    """Elements of the parameters (buffers excluded) the graph reads."""
    return sum(_numel(shape(v)) for v in graph.params.values() if not v.param.is_buffer)
