"""Normalisation table: ONNX ops -> IR op kinds (one handler per op type).

Each handler reads the current node through the :class:`OnnxContext` and
emits IR nodes with the same conventions as the PyTorch frontend (``conv``
channels on axis 1, ``linear`` on the last axis...).  Sites whose attributes
or shape inputs depend on channel counts (reshape targets, split sizes,
slice bounds, ``group``, expand shapes) are recorded with ``ctx.rewrite`` for
apply.  An op type without a handler becomes ``onnx:<OpType>``: a barrier.
"""

from __future__ import annotations

import numpy as np

ELEMENTWISE = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSigmoid": "hardsigmoid",
    "HardSwish": "hardswish", "LeakyRelu": "leaky_relu", "Elu": "elu", "Gelu": "gelu",
    "Erf": "erf", "Softplus": "softplus", "Mish": "mish", "Add": "add", "Sub": "sub", "Mul": "mul",
    "Div": "div", "Pow": "pow", "Sqrt": "sqrt", "Exp": "exp", "Log": "log", "Neg": "neg",
    "Abs": "abs", "Reciprocal": "reciprocal", "Dropout": "dropout", "Clip": "clamp",
    "Where": "where", "Max": "max", "Min": "min", "PRelu": "prelu", "Floor": "floor",
    "Ceil": "ceil", "Round": "round", "Sign": "sign", "Sin": "sin", "Cos": "cos",
    "Selu": "elu", "Celu": "elu", "Softsign": "tanh",
}
POOLS = ("GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "LpPool", "GlobalLpPool")
REDUCES = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSumExp", "ReduceSumSquare")


def handle_node(ctx, node) -> None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        _barrier(ctx, node)
    elif op in ELEMENTWISE:
        _elementwise(ctx, node, ELEMENTWISE[op])
    elif op in POOLS:
        ctx.emit("pool", [ctx.data(node.input[0])], {"axes": list(range(2, ctx.rank(node.input[0])))})
    elif op in REDUCES:
        _reduce(ctx, node)
    elif op in HANDLERS:
        HANDLERS[op](ctx, node)
    else:
        _barrier(ctx, node)


def _barrier(ctx, node) -> None:
    ctx.emit(f"onnx:{node.op_type}", [ctx.data(i) for i in node.input if i])


def _elementwise(ctx, node, kind) -> None:
    inputs = [i for i in node.input if i]
    if kind == "dropout":
        inputs = inputs[:1]
    if kind == "clamp":  # min/max bounds are scalars
        inputs = inputs[:1]
    ctx.emit(kind, [ctx.data(i) for i in inputs], outputs=node.output[:1])


def _identity(ctx, node) -> None:
    if node.input[0] in ctx.env or ctx.is_float_init(node.input[0]):
        ctx.alias(node.output[0], node.input[0])
    else:
        ctx.emit("identity", [ctx.data(node.input[0])])


def _cast(ctx, node) -> None:
    _identity(ctx, node)


def _conv(ctx, node) -> None:
    x, w = node.input[0], node.input[1]
    b = node.input[2] if len(node.input) > 2 else ""
    kind = "conv" if node.op_type == "Conv" else "conv_transpose"
    groups = int(ctx.attr("group", 1))
    if not ctx.is_float_init(w):
        ctx.emit(f"onnx:{node.op_type}(weight is not an initializer)", [ctx.data(i) for i in node.input if i])
        return
    ctx.emit(kind, [ctx.data(x), ctx.data(w), ctx.data(b)], {"groups": groups})
    if groups > 1:
        ctx.rewrite("group", out=ctx.env[node.output[0]], axis=1, groups=groups)


def _linear(ctx, x, w, bias, out_axis) -> None:
    """``x @ W (+ bias)``: a linear node, then an elementwise add for the bias."""
    out = ctx.current.output[0]
    if not bias:
        ctx.emit("linear", [ctx.data(x), ctx.data(w), None], {"weight_out_axis": out_axis})
        return
    mid = ctx.temp("linear", ctx.shape(out))
    ctx.emit("linear", [ctx.data(x), ctx.data(w), None], {"weight_out_axis": out_axis}, outputs=[mid])
    ctx.emit("add", [ctx.env[mid], ctx.data(bias)])


def _gemm(ctx, node) -> None:
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    if ctx.attr("transA", 0) or not ctx.is_float_init(b) or len(ctx.shape(b)) != 2:
        _barrier(ctx, node)
        return
    _linear(ctx, a, b, c, 0 if ctx.attr("transB", 0) else 1)


def _matmul(ctx, node) -> None:
    a, b = node.input[0], node.input[1]
    if b in ctx.transposed and ctx.rank(a) >= 2:
        _linear(ctx, a, ctx.transposed[b], "", 0)
    elif ctx.is_float_init(b) and len(ctx.shape(b)) == 2 and ctx.rank(a) >= 2:
        _linear(ctx, a, b, "", 1)
    elif ctx.is_float_init(a) or ctx.is_float_init(b):
        _barrier(ctx, node)
    else:
        ctx.emit("matmul", [ctx.data(a), ctx.data(b)])


def _batch_norm(ctx, node) -> None:
    """Running mean and variance are buffers: they follow channels, never score."""
    ins = [ctx.data(i) for i in node.input[:5]]
    for v in ins[3:]:
        if v.param is not None:
            v.param.is_buffer = True
    ctx.emit("batch_norm", ins, outputs=node.output[:1])


def _layer_norm(ctx, node) -> None:
    x = node.input[0]
    r = ctx.rank(x)
    axis = int(ctx.attr("axis", -1)) % r
    ins = [ctx.data(i) if i else None for i in (list(node.input) + ["", ""])[:3]]
    ctx.emit("layer_norm", ins, {"normalized_ndim": r - axis}, outputs=node.output[:1])


def _instance_norm(ctx, node) -> None:
    ctx.emit("instance_norm", [ctx.data(i) for i in node.input[:3]])


def _group_norm(ctx, node) -> None:
    ctx.emit("group_norm", [ctx.data(i) for i in node.input[:3]])


def _concat(ctx, node) -> None:
    ctx.emit("cat", [ctx.data(i) for i in node.input if i], {"axis": int(ctx.attr("axis"))})


def _split(ctx, node) -> None:
    x = node.input[0]
    axis = int(ctx.attr("axis", 0)) % ctx.rank(x)
    sizes = [ctx.shape(o)[axis] for o in node.output]
    split_in = node.input[1] if len(node.input) > 1 else ""
    rewritable = not split_in or ctx.elems_of(split_in) is not None and all(
        e.kind == "const" for e in ctx.elems_of(split_in))
    ctx.emit("split", [ctx.data(x)], {"axis": axis, "sizes": sizes, "rewritable": rewritable})
    if rewritable:
        ctx.rewrite("split", outs=[ctx.env[o] for o in node.output], axis=axis, input=split_in)


def _slice(ctx, node) -> None:
    x, out = node.input[0], node.output[0]
    shape = ctx.shape(x)
    r = len(shape)
    parts = [ctx.elems_of(n) if n else None for n in (list(node.input) + [""] * 5)[1:5]]
    if parts[0] is None or parts[1] is None or (node.input[3:4] and node.input[3] and parts[2] is None) \
            or (len(node.input) > 4 and node.input[4] and parts[3] is None):
        axes = [a for a in range(r) if shape[a] != ctx.shape(out)[a]]
        ctx.emit("slice", [ctx.data(x)], {"axes": axes, "starts": [0] * len(axes),
                                          "ends": [ctx.shape(out)[a] for a in axes], "steps": [1] * len(axes)})
        return
    starts, ends = parts[0], parts[1]
    axes = [e.value % r for e in parts[2]] if parts[2] is not None else list(range(len(starts)))
    steps = [e.value for e in parts[3]] if parts[3] is not None else [1] * len(starts)
    norm = [slice(s.value, e.value, st).indices(shape[a]) for s, e, st, a in zip(starts, ends, steps, axes)]
    const = all(e.kind == "const" for e in starts + ends)
    ctx.emit("slice", [ctx.data(x)], {"axes": axes, "starts": [n[0] for n in norm], "ends": [n[1] for n in norm],
                                      "steps": steps, "rewritable": const})
    if const:
        ctx.rewrite("slice", x=ctx.data(x), out=ctx.env[out], axes=axes, starts=starts, ends=ends,
                    norm=norm)


def _reshape(ctx, node) -> None:
    x, out = node.input[0], node.output[0]
    elems = ctx.elems_of(node.input[1])
    oshape = ctx.shape(out)
    if elems is None or len(elems) != len(oshape):
        ctx.emit("reshape", [ctx.data(x)], {"static": [True] * len(oshape)})
        return
    inputs, sources, static = [ctx.data(x)], [], []
    for e in elems:
        src = None
        if e.kind == "dim" and e.ref[0] in ctx.env:
            inputs.append(ctx.data(e.ref[0]))
            src = (len(inputs) - 1, e.ref[1])
        sources.append(src)
        static.append(e.kind == "unknown")
    ctx.emit("reshape", inputs, {"static": static, "sources": sources, "rewritable": True})
    ctx.rewrite("reshape", out=ctx.env[out], elems=elems)


def _flatten_like(ctx, node) -> None:
    ctx.emit("reshape", [ctx.data(node.input[0])])


def _transpose(ctx, node) -> None:
    """A transposed 2-D weight read only as ``MatMul``'s right operand is folded
    into that ``linear`` (``x @ W.T`` with ``W`` of shape ``[O, I]``)."""
    x, out = node.input[0], node.output[0]
    r = ctx.rank(x)
    perm = list(ctx.attr("perm") or list(range(r))[::-1])
    readers = ctx.readers.get(out, [])
    if ctx.is_float_init(x) and perm == [1, 0] and readers and all(
            n.op_type == "MatMul" and i == 1 for n, i in readers):
        ctx.transposed[out] = x
        return
    ctx.emit("permute", [ctx.data(x)], {"perm": perm})


def _reduce(ctx, node) -> None:
    x = node.input[0]
    r = ctx.rank(x)
    axes = ctx.attr("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        val = ctx.const(node.input[1])
        axes = None if val is None else np.asarray(val).ravel().tolist()
        if val is None:
            _barrier(ctx, node)
            return
    if not axes:
        axes = [] if ctx.attr("noop_with_empty_axes", 0) else list(range(r))
    ctx.emit("reduce", [ctx.data(x)], {"axes": [a % r for a in axes], "keepdim": bool(ctx.attr("keepdims", 1))})


def _softmax(ctx, node) -> None:
    r = ctx.rank(node.input[0])
    default = -1 if ctx.opset >= 13 else 1
    axis = int(ctx.attr("axis", default)) % r
    dims = [axis] if ctx.opset >= 13 else list(range(axis, r))
    ctx.emit("softmax", [ctx.data(node.input[0])], {"dim": axis, "dims": dims})


def _gather(ctx, node) -> None:
    data, idx = node.input[0], node.input[1]
    axis = int(ctx.attr("axis", 0)) % len(ctx.shape(data))
    if ctx.is_float_init(data) and len(ctx.shape(data)) == 2 and axis == 0:
        ctx.emit("embedding", [ctx.data(idx), ctx.data(data)])
        return
    val = ctx.const(idx)
    if val is None:
        _barrier(ctx, node)
        return
    spec = ["full"] * axis + ["int" if np.ndim(val) == 0 else "slice"]
    ctx.emit("index", [ctx.data(data)], {"index": spec})


def _expand(ctx, node) -> None:
    x, out = node.input[0], node.output[0]
    elems = ctx.elems_of(node.input[1])
    r = ctx.rank(out)
    lead = r - (len(elems) if elems is not None else r)
    static = [True] * r
    if elems is not None:
        for i, e in enumerate(elems):
            static[lead + i] = not (e.kind == "const" or e.value == 1)
    ctx.emit("expand", [ctx.data(x)], {"static": static})
    if elems is not None:
        ctx.rewrite("expand", out=ctx.env[out], elems=elems, lead=lead)


def _pad(ctx, node) -> None:
    x = node.input[0]
    r = ctx.rank(x)
    pads = ctx.attr("pads")
    if pads is None and len(node.input) > 1:
        pads = ctx.const(node.input[1])
    axes_in = ctx.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if pads is None:
        axes = list(range(r))
    else:
        pads = np.asarray(pads).ravel().tolist()
        ax = [a % r for a in np.asarray(axes_in).ravel().tolist()] if axes_in is not None else list(range(r))
        n = len(ax)
        axes = [a for i, a in enumerate(ax) if pads[i] or pads[i + n]]
    ctx.emit("spatial", [ctx.data(x)], {"axes": axes})


def _resize(ctx, node) -> None:
    x = node.input[0]
    r = ctx.rank(x)
    same = [a for a in range(r) if ctx.shape(x)[a] == ctx.shape(node.output[0])[a]]
    sizes_given = len(node.input) > 3 and node.input[3]
    axes = list(range(r)) if sizes_given else [a for a in range(r) if a not in same or a >= 2]
    ctx.emit("spatial", [ctx.data(x)], {"axes": axes})


HANDLERS = {
    "Identity": _identity, "Cast": _cast, "Conv": _conv, "ConvTranspose": _conv, "Gemm": _gemm,
    "MatMul": _matmul, "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm, "GroupNormalization": _group_norm, "Concat": _concat,
    "Split": _split, "Slice": _slice, "Reshape": _reshape, "Flatten": _flatten_like,
    "Squeeze": _flatten_like, "Unsqueeze": _flatten_like, "Transpose": _transpose, "Softmax": _softmax,
    "LogSoftmax": _softmax, "Gather": _gather, "Expand": _expand, "Pad": _pad, "Resize": _resize,
    "Upsample": _resize,
}
