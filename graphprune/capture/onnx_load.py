"""Load an ONNX model, normalise it, and learn the shape of every value.

Normalisation (done identically before capture and before apply, so names
agree): ``Constant`` nodes become initializers named by their output, and a
small integer initializer read by several nodes is copied once per reader,
so a rewritten reshape target never changes another node's input.  The
caller's ``ModelProto`` is never modified; a copy is returned.

Shapes come from ONNX shape inference (with data propagation) on a copy
whose symbolic input dimensions are made concrete; values it cannot type are
measured by running the model once in onnxruntime.  Where both fail,
:class:`CaptureError` names the value and its producer.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import CaptureError

SMALL_INT = 64  # int initializers up to this size are shape data, copied per reader


def load_model(model_or_path) -> onnx.ModelProto:
    """A private copy of ``model_or_path`` (a ``ModelProto`` or a file path)."""
    if isinstance(model_or_path, onnx.ModelProto):
        out = onnx.ModelProto()
        out.CopyFrom(model_or_path)
        return out
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise CaptureError(f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}")
    path = os.fspath(model_or_path)
    if not os.path.isfile(path):
        raise CaptureError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(path)
    except Exception as err:
        raise CaptureError(f"cannot read ONNX file {path}: {type(err).__name__}: {_first(err)}") from err
    if not model.graph.node:
        raise CaptureError(f"{path} holds no ONNX graph (empty or not an ONNX file)")
    return model


def _first(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constants to initializers; ``Identity`` of an initializer becomes a copy
    named by its output (exporters deduplicate equal tensors, e.g. zero biases
    of unrelated layers, this way); small int initializers unshared.  In place."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            g.initializer.append(_constant_tensor(node))
        elif node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            g.initializer.append(copy)
        else:
            keep.append(node)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    _unshare_small_ints(g)
    return model


def _constant_tensor(node) -> onnx.TensorProto:
    attr = node.attribute[0]
    name = node.output[0]
    if attr.name == "value":
        arr = numpy_helper.to_array(attr.t)
    elif attr.name in ("value_float", "value_int"):
        arr = np.array(helper.get_attribute_value(attr),
                       dtype=np.float32 if attr.name == "value_float" else np.int64)
    elif attr.name in ("value_floats", "value_ints"):
        arr = np.array(helper.get_attribute_value(attr),
                       dtype=np.float32 if attr.name == "value_floats" else np.int64)
    else:
        raise CaptureError(f"Constant node '{node.name}' uses unsupported attribute '{attr.name}'")
    return numpy_helper.from_array(arr, name)


def _unshare_small_ints(g) -> None:
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            if name in inits:
                readers[name] = readers.get(name, 0) + 1
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    for node in g.node:
        for i, name in enumerate(node.input):
            t = inits.get(name)
            if t is None or readers[name] < 2 or not _is_small_int(t):
                continue
            readers[name] -= 1
            new = fresh_name(f"{name}__{node.name or node.op_type}_{i}", taken)
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            copy.name = new
            g.initializer.append(copy)
            node.input[i] = new


def _is_small_int(t: onnx.TensorProto) -> bool:
    n = int(np.prod(t.dims)) if t.dims else 1
    return t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and n <= SMALL_INT


def fresh_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... : the first not in ``taken`` (which it joins)."""
    base, i = name, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def input_shapes(model: onnx.ModelProto, inputs: dict | None = None, batch: int = 1) -> dict[str, tuple]:
    """Concrete input shapes: from ``inputs`` if given, else symbolic dims -> ``batch``."""
    shapes = {}
    for v in graph_inputs(model):
        if inputs is not None and v.name in inputs:
            shapes[v.name] = tuple(np.shape(inputs[v.name]))
            continue
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else batch for d in dims)
    return shapes


def _fix_input_dims(model: onnx.ModelProto, shapes: dict[str, tuple], strip: bool = True) -> onnx.ModelProto:
    """A copy with concrete input dims and no value_info.  With ``strip``, big
    float initializers become typed inputs (inference needs their shapes,
    not their bytes)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for v in m.graph.input:
        if v.name in shapes:
            for d, n in zip(v.type.tensor_type.shape.dim, shapes[v.name]):
                d.Clear()
                d.dim_value = int(n)
    if strip:
        small = []
        for t in m.graph.initializer:
            if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) or int(np.prod(t.dims)) <= SMALL_INT:
                small.append(t)
            else:
                m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        del m.graph.initializer[:]
        m.graph.initializer.extend(small)
    return m


def _record(shapes, dtypes, vi) -> None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape") or any(not d.HasField("dim_value") for d in tt.shape.dim):
        return
    shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    dtypes[vi.name] = helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else None


def infer_shapes(model: onnx.ModelProto, shapes_in: dict[str, tuple]):
    """``(shapes, dtypes)`` of every value, by inference, then by running it."""
    fixed = _fix_input_dims(model, shapes_in)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, check_type=False, strict_mode=False, data_prop=True)
    except Exception as err:  # inference itself may reject a malformed graph
        raise CaptureError(f"ONNX shape inference failed: {type(err).__name__}: {_first(err)}") from err
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, str | None] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        _record(shapes, dtypes, vi)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
        dtypes[t.name] = helper.tensor_dtype_to_np_dtype(t.data_type).name
    missing = [o for n in g.node for o in n.output if o and o not in shapes]
    if missing:
        _measure(_fix_input_dims(model, shapes_in, strip=False), shapes_in, missing, shapes, dtypes)
    return shapes, dtypes


def _measure(model, shapes_in, missing, shapes, dtypes) -> None:
    """Run ``model`` once in onnxruntime with ``missing`` exposed as outputs."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    m.graph.output.extend([onnx.ValueInfoProto(name=n) for n in missing if n not in known])
    feeds = random_inputs(model, shapes_in)
    try:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = sess.run(missing, feeds)
    except Exception as err:
        producer = next((n for n in model.graph.node if missing[0] in n.output), None)
        where = f" (output of {producer.op_type} node '{producer.name}')" if producer else ""
        raise CaptureError(f"cannot infer the shape of '{missing[0]}'{where}: ONNX shape inference gives "
                           f"none and onnxruntime cannot run the model ({type(err).__name__}: "
                           f"{_first(err)[:160]})") from err
    for name, arr in zip(missing, outs):
        shapes[name] = tuple(np.shape(arr))
        dtypes[name] = np.asarray(arr).dtype.name


def random_inputs(model: onnx.ModelProto, shapes: dict[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the given shapes and the declared element types."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in graph_inputs(model):
        dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        shape = shapes[v.name]
        if np.issubdtype(dtype, np.floating):
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[v.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds
