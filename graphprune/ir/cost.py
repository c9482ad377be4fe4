"""Cost of an IR graph: multiply-accumulates of the weight layers and
activation products, from the shapes recorded at capture (framework-free)."""

from __future__ import annotations

import math


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape else 1


def node_macs(node) -> int:
    """MACs of one node (0 for ops that do no multiply-accumulate work)."""
    out = node.outputs[0].shape if node.outputs else None
    if out is None:
        return 0
    if node.op == "conv":
        w = node.inputs[1].shape
        return _numel(out) * _numel(w[1:])
    if node.op == "conv_transpose":
        x, w = node.inputs[0].shape, node.inputs[1].shape
        return _numel(x) * _numel(w[1:])
    if node.op == "linear":
        x = node.inputs[0].shape
        return _numel(out) * x[-1]
    if node.op == "matmul":
        return _numel(out) * node.inputs[0].shape[-1]
    return 0


def graph_macs(graph) -> int:
    return sum(node_macs(n) for n in graph.nodes)
