"""Capture an ONNX model into the IR (the same IR as for PyTorch).

Float initializers read as data become parameters named by their initializer
name.  Integer tensors computed only from constants and ``Shape`` reads (the
``Shape -> Gather -> Concat -> Reshape`` chains of exporters) are *shape data*:
they are evaluated here, never emitted as IR nodes, and each element of a
1-D shape tensor remembers where it comes from (an initializer entry that
apply may rewrite, a dimension of another tensor, or arithmetic on those).
Every other node goes through the op table in :mod:`.onnx_ops`; an op with
no entry becomes an IR node ``onnx:<OpType>`` without a coupling rule, i.e.
a barrier.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import CaptureError
from ..ir import Graph
from .onnx_load import graph_inputs, infer_shapes, input_shapes, load_model, normalise


@dataclass(frozen=True)
class Elem:
    """One entry of a 1-D shape tensor.

    ``kind``: ``"const"`` (``ref`` = (initializer, flat index): rewritable),
    ``"dim"`` (``ref`` = (value name, axis): follows that tensor),
    ``"derived"`` (arithmetic on the above; follows the model at run time) or
    ``"unknown"``.  ``value`` is the concrete number (``None`` if unknown).
    """

    kind: str
    value: int | None
    ref: tuple | None = None


@dataclass
class OnnxCaptured:
    """The IR plus what apply needs: the normalised model and rewrite sites."""

    graph: Graph
    model: onnx.ModelProto
    shapes: dict
    rewrites: list[dict] = field(default_factory=list)
    method: str = "onnx"


class OnnxContext:
    """State of one capture; handed to the op table."""

    def __init__(self, model: onnx.ModelProto, shapes, dtypes):
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.graph = Graph()
        self.shapes, self.dtypes = shapes, dtypes
        self.inits = {t.name: t for t in model.graph.initializer}
        self.env: dict[str, object] = {}
        self.values: dict[str, np.ndarray] = {}   # known constant tensors (shape data)
        self.elems: dict[str, list[Elem]] = {}    # provenance of 1-D/0-D shape data
        self.deps: dict[str, set] = {}            # shape data -> {(value name, axis)} it was computed from
        self.rewrites: list[dict] = []
        self.transposed: dict[str, str] = {}      # Transpose output -> 2-D weight it transposes
        self.readers: dict[str, list] = {}        # value name -> [(node, input index)]
        for n in model.graph.node:
            for i, name in enumerate(n.input):
                self.readers.setdefault(name, []).append((n, i))
        self.index = 0
        self.current: onnx.NodeProto | None = None

    # -- what handlers read ----------------------------------------------
    def is_float_init(self, name: str) -> bool:
        t = self.inits.get(name)
        return t is not None and np.issubdtype(helper.tensor_dtype_to_np_dtype(t.data_type), np.floating)

    def is_static(self, name: str) -> bool:
        """Known without running the model (int constants and shape data)."""
        if name in self.values:
            return True
        if name in self.inits and not self.is_float_init(name):
            self.values[name] = numpy_helper.to_array(self.inits[name])
            self.elems[name] = _init_elems(name, self.values[name])
            return True
        return False

    def const(self, name: str):
        """The concrete value of a static input (``None`` if not static)."""
        return self.values.get(name) if name and self.is_static(name) else None

    def elems_of(self, name: str) -> list[Elem] | None:
        return self.elems.get(name) if name and self.is_static(name) else None

    def shape(self, name: str) -> tuple:
        return self.shapes[name]

    def rank(self, name: str) -> int:
        return len(self.shapes[name])

    def data(self, name: str):
        """The IR value read by input ``name`` (``None`` for an absent input)."""
        if not name:
            return None
        if name in self.env:
            return self.env[name]
        if self.is_float_init(name):
            t = self.inits[name]
            v = self.graph.add_param(name, tuple(t.dims), False,
                                     helper.tensor_dtype_to_np_dtype(t.data_type).name)
        elif self.deps.get(name):
            v = self._shape_read(name)
        elif name in self.shapes:
            v = self.graph.add_input(f"const:{name}", self.shapes[name], self.dtypes.get(name))
        else:
            raise CaptureError(f"{self.where()} reads '{name}', which is neither produced nor an initializer")
        self.env[name] = v
        return v

    def _shape_read(self, name: str):
        """Shape data used as tensor data (a softmax scale from ``q``'s width):
        an IR node reading the tensors whose dimensions it was computed from."""
        deps = sorted(d for d in self.deps[name] if d[0] in self.env)
        srcs = sorted({d[0] for d in deps})
        inputs = [self.env[s] for s in srcs]
        reads = [(srcs.index(v), axis) for v, axis in deps]
        ir = self.graph.add_node("shape_read", inputs, [self.shapes.get(name, ())], name=f"shape_read:{name}",
                                 attrs={"reads": reads}, source=f"ONNX shape data '{name}' used as a tensor")
        return ir.outputs[0]

    def attr(self, name: str, default=None):
        for a in self.current.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def where(self) -> str:
        n = self.current
        return f"{n.op_type} node '{n.name or '#' + str(self.index)}'"

    # -- what handlers write ---------------------------------------------
    def emit(self, op: str, inputs, attrs=None, outputs=None):
        """Add an IR node for the current ONNX node (``outputs``: value names)."""
        n = self.current
        names = list(outputs) if outputs is not None else [o for o in n.output if o]
        for o in names:
            if o not in self.shapes:
                raise CaptureError(f"cannot infer the shape of '{o}' ({self.where()})")
        ir = self.graph.add_node(op, inputs, [self.shapes[o] for o in names],
                                 name=n.name or f"{n.op_type}_{self.index}", attrs=attrs,
                                 source=f"ONNX {self.where()}",
                                 dtypes=[self.dtypes.get(o) for o in names])
        for o, v in zip(names, ir.outputs):
            self.env[o] = v
        return ir

    def temp(self, suffix: str, shape) -> str:
        """Name an intermediate value (e.g. Gemm before its bias)."""
        name = f"{self.current.output[0]}::{suffix}"
        self.shapes[name] = tuple(shape)
        self.dtypes[name] = self.dtypes.get(self.current.output[0])
        return name

    def alias(self, out: str, src: str) -> None:
        self.env[out] = self.data(src)

    def rewrite(self, kind: str, **info) -> None:
        """Record a site whose attributes or shape inputs apply must recompute."""
        self.rewrites.append({"kind": kind, "node": self.index, **info})


def _init_elems(name: str, arr: np.ndarray) -> list[Elem] | None:
    if arr.ndim > 1 or arr.size > 64 or not np.issubdtype(arr.dtype, np.integer):
        return None
    return [Elem("const", int(v), (name, i)) for i, v in enumerate(arr.ravel().tolist())]


def capture_onnx(model: onnx.ModelProto, inputs: dict | None = None, batch: int = 1) -> OnnxCaptured:
    """Normalise a private copy of ``model`` and translate it to the IR."""
    from .onnx_ops import handle_node
    from .onnx_static import try_static

    model = normalise(load_model(model))
    shapes, dtypes = infer_shapes(model, input_shapes(model, inputs, batch))
    ctx = OnnxContext(model, shapes, dtypes)
    for v in graph_inputs(model):
        ctx.env[v.name] = ctx.graph.add_input(v.name, shapes[v.name], dtypes.get(v.name))
    for i, node in enumerate(model.graph.node):
        ctx.index, ctx.current = i, node
        if not try_static(ctx, node):
            handle_node(ctx, node)
    outs = []
    for o in model.graph.output:
        if o.name not in ctx.env and not ctx.is_static(o.name):
            raise CaptureError(f"graph output '{o.name}' is never produced")
        outs.append(ctx.data(o.name))
    ctx.graph.set_outputs(outs)
    ctx.graph.lint()
    return OnnxCaptured(ctx.graph, model, shapes, ctx.rewrites)
