"""Measured-latency cost model for budgets (onnxruntime on this machine).

The latency of a model is estimated as the sum of the latencies of its
weight layers (conv, linear, activation matmul), each measured once as a
single-node ONNX model in onnxruntime (CPU, ``threads`` intra-op threads,
median of ``repeats`` runs) and cached by its configuration, in memory and
in a JSON file (``GRAPHPRUNE_CACHE`` or ``~/.cache/graphprune``).  A plan's
latency fraction is ``sum(new layers) / sum(dense layers)``; other ops are
left out, so the estimate runs below the measured fraction of the whole
model (ResNet-18 at an estimated 0.49 measured 0.58 end to end).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .atomic import atomic_path

_MEMORY: dict[str, float] = {}


def _cache_path() -> str:
    folder = os.environ.get("GRAPHPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graphprune")
    return os.path.join(folder, "latency.json")


def _load_disk() -> None:
    path = _cache_path()
    if not _MEMORY and os.path.isfile(path):
        try:
            with open(path) as f:
                _MEMORY.update(json.load(f))
        except (OSError, ValueError):
            pass


def _save_disk() -> None:
    path = _cache_path()
    try:
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(_MEMORY, f)
    except OSError:
        pass


def _layer_key(node, shape) -> str | None:
    """Cache key of a weight layer with the given shapes (``None``: not timed)."""
    x, out = tuple(shape(node.inputs[0])), tuple(shape(node.outputs[0]))
    if node.op == "conv" and len(x) == 4:
        w, a = tuple(shape(node.inputs[1])), node.attrs
        return (f"conv{x}{w}s{tuple(a.get('stride', (1, 1)))}p{a.get('padding', (0, 0))}"
                f"d{tuple(a.get('dilation', (1, 1)))}")
    if node.op in ("linear", "matmul"):
        m = int(np.prod(x[:-1])) if len(x) > 1 else 1
        return f"gemm{m}x{x[-1]}x{out[-1]}"
    return None


def _layer_model(node, shape) -> onnx.ModelProto:
    """A single-node ONNX model computing the layer with the given shapes."""
    x, out = tuple(shape(node.inputs[0])), tuple(shape(node.outputs[0]))
    if node.op == "conv":
        w, a = tuple(shape(node.inputs[1])), node.attrs
        pad = a.get("padding", (0, 0))
        pads = [0, 0, 0, 0] if isinstance(pad, str) else list(pad) * 2
        n = helper.make_node("Conv", ["x", "w"], ["y"], group=max(1, x[1] // w[1]),
                             strides=list(a.get("stride", (1, 1))), pads=pads,
                             dilations=list(a.get("dilation", (1, 1))))
    else:
        w = (x[-1], out[-1])
        x = (int(np.prod(x[:-1])) if len(x) > 1 else 1, x[-1])
        n = helper.make_node("MatMul", ["x", "w"], ["y"])
    weight = numpy_helper.from_array(np.ones(w, dtype=np.float32), "w")
    graph = helper.make_graph([n], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _measure(model: onnx.ModelProto, threads: int, repeats: int) -> float:
    from .verify.onnx_verify import median_seconds, session

    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    return median_seconds(session(model, threads=threads), feed, repeats, warmup=1)


class LatencyModel:
    """Callable ``(graph, shape) -> seconds`` for :mod:`graphprune.planning.budget`."""

    def __init__(self, threads: int = 1, repeats: int = 15):
        self.threads = threads
        self.repeats = repeats
        self.measured = 0  # layers timed by this instance (the rest came from the cache)

    def __call__(self, graph, shape=lambda v: v.shape) -> float:
        _load_disk()
        total, fresh = 0.0, False
        for node in graph.nodes:
            if node.op not in ("conv", "linear", "matmul") or not node.outputs or node.outputs[0].shape is None:
                continue
            if 0 in tuple(shape(node.outputs[0])):
                continue
            key = _layer_key(node, shape)
            if key is None:
                continue
            key = f"{key}t{self.threads}"
            if key not in _MEMORY:
                _MEMORY[key] = _measure(_layer_model(node, shape), self.threads, self.repeats)
                self.measured += 1
                fresh = True
            total += _MEMORY[key]
        if fresh:
            _save_disk()
        return total
