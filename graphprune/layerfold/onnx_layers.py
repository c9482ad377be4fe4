"""Read the linear layers and BatchNorms of an ONNX graph as numpy layers, and write layers back.

A *unit* is one linear layer as ONNX spells it: a ``Conv``; a ``Gemm``
(``transA=0``); or a ``MatMul`` by a constant 2-d weight, with the ``Add``
of a constant bias that is its only reader when there is one.  Reading
gives a :class:`~graphprune.layerfold.compose.ConvLayer` (PyTorch layout,
float64) or a :class:`NotALayer` whose one-line reason says why the node
cannot be folded (non-constant weight, ``auto_pad=SAME_*``, asymmetric
pads...).  Writing (:func:`emit`) gives the canonical nodes for a layer:
``Conv`` with explicit attributes, ``Gemm`` with ``transB=1``, or
``MatMul`` by ``W.T`` then ``Add`` of the bias.

Invariant: the emitted nodes compute the layer they are given, in the
element type of the unit they replace; nothing here mutates a graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .compose import ConvLayer, FoldError

__all__ = ["LAYER_OPS", "ACTIVATIONS", "Unit", "NotALayer", "attrs", "is_std", "read_unit", "bias_add",
           "read_bn", "emit"]

LAYER_OPS = ("Conv", "Gemm", "MatMul")
ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish",
                         "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu"})
FLOATS = (np.float16, np.float32, np.float64)


def is_std(node: onnx.NodeProto) -> bool:
    """The node is an operator of the default ONNX domain."""
    return node.domain in ("", "ai.onnx")


def attrs(node: onnx.NodeProto) -> dict:
    """Attribute values by name (strings decoded)."""
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


@dataclass(frozen=True)
class NotALayer:
    """A Conv/Gemm/MatMul node that cannot be read as a foldable layer, and why."""

    name: str
    reason: str


@dataclass(frozen=True, eq=False)
class Unit:
    """One linear layer of the graph: its nodes (main node first), values and numbers.

    ``weight_name`` / ``bias_name`` are the initializers it reads (``bias_name``
    is ``""`` without a bias); ``dtype`` is their element type.
    """

    op: str
    nodes: tuple[onnx.NodeProto, ...]
    layer: ConvLayer
    dtype: np.dtype
    weight_name: str
    bias_name: str = ""

    @property
    def name(self) -> str:
        return self.nodes[0].name

    @property
    def input(self) -> str:
        return self.nodes[0].input[0]

    @property
    def output(self) -> str:
        return self.nodes[-1].output[0]


Consts = Callable[[str], "np.ndarray | None"]


def _const(consts: Consts, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | str:
    name = node.input[index]
    arr = consts(name)
    if arr is None:
        return f"the {what} '{name}' of '{node.name}' is not a constant initializer"
    if arr.dtype not in FLOATS:
        return f"the {what} '{name}' of '{node.name}' has element type {arr.dtype}, not float"
    return arr


def _bias(consts: Consts, node: onnx.NodeProto, index: int) -> np.ndarray | str | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    return _const(consts, node, index, "bias")


def _conv(node: onnx.NodeProto, consts: Consts) -> Unit | NotALayer:
    w, b = _const(consts, node, 1, "weight"), _bias(consts, node, 2)
    for v in (w, b):
        if isinstance(v, str):
            return NotALayer(node.name, v)
    if w.ndim < 3:
        return NotALayer(node.name, f"conv '{node.name}' has a weight of rank {w.ndim}")
    a, nd = attrs(node), w.ndim - 2
    auto = a.get("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "VALID"):
        return NotALayer(node.name, f"conv '{node.name}' uses auto_pad={auto} (padding depends on the input size)")
    pads = list(a.get("pads", [0] * 2 * nd)) if auto == "NOTSET" else [0] * 2 * nd
    if pads[:nd] != pads[nd:]:
        return NotALayer(node.name, f"conv '{node.name}' pads asymmetrically (pads {pads})")
    if "kernel_shape" in a and tuple(a["kernel_shape"]) != tuple(w.shape[2:]):
        return NotALayer(node.name, f"conv '{node.name}' has kernel_shape {a['kernel_shape']} but a weight of "
                                    f"shape {list(w.shape)}")
    try:
        layer = ConvLayer.conv(w, b, a.get("strides", 1), pads[:nd], a.get("dilations", 1), int(a.get("group", 1)))
    except FoldError as err:
        return NotALayer(node.name, f"conv '{node.name}': {err}")
    return Unit("Conv", (node,), layer, w.dtype, node.input[1], node.input[2] if b is not None else "")


def _per_output(b: np.ndarray, out: int, shapes: tuple[tuple[int, ...], ...]) -> np.ndarray | None:
    """``b`` as one value per output channel, if its shape is one of ``shapes`` or a single element."""
    if b.size == 1 and b.ndim <= max(len(s) for s in shapes):
        return np.full(out, float(b.reshape(-1)[0]))
    return b.reshape(-1).astype(np.float64) if tuple(b.shape) in shapes else None


def _gemm(node: onnx.NodeProto, consts: Consts) -> Unit | NotALayer:
    a = attrs(node)
    if a.get("transA", 0):
        return NotALayer(node.name, f"Gemm '{node.name}' transposes its data input (transA=1)")
    w, c = _const(consts, node, 1, "weight"), _bias(consts, node, 2)
    for v in (w, c):
        if isinstance(v, str):
            return NotALayer(node.name, v)
    w = (w if a.get("transB", 0) else w.T).astype(np.float64) * float(a.get("alpha", 1.0))
    bias = None
    if c is not None:
        bias = _per_output(c, w.shape[0], ((w.shape[0],), (1, w.shape[0])))
        if bias is None:
            return NotALayer(node.name, f"the bias of Gemm '{node.name}' (shape {list(c.shape)}) is not one value "
                                        "per output")
        bias = bias * float(a.get("beta", 1.0))
    dtype = np.asarray(consts(node.input[1])).dtype
    bias_name = node.input[2] if c is not None else ""
    return Unit("Gemm", (node,), ConvLayer.linear(w, bias), dtype, node.input[1], bias_name)


def bias_add(node: onnx.NodeProto, consts: Consts, readers: Callable[[str], list]) -> tuple | None:
    """``(add_node, bias_name, bias)`` when the only reader of MatMul ``node`` adds a constant per-output bias."""
    users = readers(node.output[0])
    add = users[0] if len(users) == 1 else None
    if add is None or add.op_type != "Add" or not is_std(add) or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    if other == node.output[0]:
        return None
    b, out = consts(other), consts(node.input[1]).shape[1]
    if b is None or b.dtype != consts(node.input[1]).dtype:
        return None
    bias = _per_output(b, out, ((out,),))
    return None if bias is None else (add, other, bias)


def _matmul(node: onnx.NodeProto, consts: Consts, readers: Callable[[str], list]) -> Unit | NotALayer:
    w = _const(consts, node, 1, "weight")
    if isinstance(w, str):
        return NotALayer(node.name, w)
    if w.ndim != 2:
        return NotALayer(node.name, f"MatMul '{node.name}' multiplies by a weight of rank {w.ndim}, not 2")
    found = bias_add(node, consts, readers)
    if found is None:
        return Unit("MatMul", (node,), ConvLayer.linear(w.T), w.dtype, node.input[1])
    add, bias_name, bias = found
    return Unit("MatMul", (node, add), ConvLayer.linear(w.T, bias), w.dtype, node.input[1], bias_name)


def read_unit(node: onnx.NodeProto, consts: Consts, readers: Callable[[str], list]) -> Unit | NotALayer | None:
    """The layer whose main node is ``node``, or why it is not foldable; ``None`` for other ops.

    ``consts(name)`` gives an initializer's array (``None`` if the value is
    not a constant); ``readers(value)`` the nodes that read a value (graph
    outputs and subgraphs count as readers other than any node).
    """
    if node.op_type not in LAYER_OPS or not is_std(node) or len(node.input) < 2:
        return None
    if node.op_type == "Conv":
        return _conv(node, consts)
    if node.op_type == "Gemm":
        return _gemm(node, consts)
    return _matmul(node, consts, readers)


def read_bn(node: onnx.NodeProto, consts: Consts) -> tuple | str:
    """``(gamma, beta, mean, var, eps)`` of an inference-mode BatchNormalization, or why not."""
    a = attrs(node)
    if a.get("training_mode", 0):
        return f"'{node.name}' is in training mode (normalises with batch statistics)"
    if not a.get("spatial", 1):
        return f"'{node.name}' has spatial=0 (statistics per element, not per channel)"
    if len(node.input) != 5:
        return f"'{node.name}' has {len(node.input)} inputs, not 5"
    params = []
    for i, what in enumerate(("scale", "bias", "mean", "variance"), start=1):
        p = _const(consts, node, i, what)
        if isinstance(p, str):
            return p
        if p.ndim != 1 or (params and p.shape != params[0].shape):
            return f"the {what} of '{node.name}' has shape {list(p.shape)}, not one value per channel"
        params.append(p.astype(np.float64))
    return (*params, float(a.get("epsilon", 1e-5)))


def _tensor(arr: np.ndarray, dtype: np.dtype, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr).astype(dtype), name)


def emit(unit: Unit, layer: ConvLayer, inp: str, out: str, names: Callable[[str, str], str]):
    """``(nodes, initializers)`` computing ``layer`` from value ``inp`` into value ``out``.

    The op follows ``unit`` (Conv, Gemm, or MatMul then Add); node names
    reuse the unit's.  ``names(kind, base)`` returns a free name for a new
    value, node or initializer (``kind``: "value" / "node" / "init").
    """
    c, dt = layer.config, unit.dtype
    wname = names("init", unit.weight_name)
    bname = "" if layer.bias is None else names("init", unit.bias_name or _bias_name(unit.weight_name))
    inits = [] if layer.bias is None else [_tensor(layer.bias, dt, bname)]
    if unit.op == "Conv":
        node = helper.make_node("Conv", [inp, wname, *([bname] if bname else [])], [out], name=unit.name,
                                kernel_shape=list(c.kernel), strides=list(c.stride), pads=list(c.padding) * 2,
                                dilations=list(c.dilation), group=c.groups)
        return [node], [_tensor(layer.weight, dt, wname), *inits]
    if unit.op == "Gemm":
        node = helper.make_node("Gemm", [inp, wname, *([bname] if bname else [])], [out], name=unit.name, transB=1)
        return [node], [_tensor(layer.weight, dt, wname), *inits]
    if not bname:
        return [helper.make_node("MatMul", [inp, wname], [out], name=unit.name)], [_tensor(layer.weight.T, dt, wname)]
    old = unit.nodes[0].output[0] if len(unit.nodes) > 1 else out + "_matmul"
    mid = names("value", old)
    add_name = unit.nodes[1].name if len(unit.nodes) > 1 else names("node", unit.name + "/bias")
    nodes = [helper.make_node("MatMul", [inp, wname], [mid], name=unit.name),
             helper.make_node("Add", [mid, bname], [out], name=add_name)]
    return nodes, [_tensor(layer.weight.T, dt, wname), *inits]


def _bias_name(weight_name: str) -> str:
    if weight_name.endswith(".weight"):
        return weight_name[: -len(".weight")] + ".bias"
    return weight_name + ".bias"
