"""Shape data: evaluate ONNX nodes whose inputs are all known without data.

A node is *static* when it reads a tensor's shape (``Shape``, ``Size``) or
when every input is an integer constant or another static result.  Its
outputs are computed here (numpy for the usual shape ops, onnx's reference
evaluator for the rest) and, for small 1-D integer results, each element
keeps its provenance (:class:`~graphprune.capture.onnx_capture.Elem`).
Static nodes never become IR nodes: they carry no channels.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from .onnx_capture import Elem

SHAPE_READERS = ("Shape", "Size")
PASS_THROUGH = ("Unsqueeze", "Squeeze", "Identity", "Cast", "Reshape", "Flatten")


def try_static(ctx, node) -> bool:
    """Evaluate ``node`` if it is static; return whether it was."""
    ins = [i for i in node.input if i]
    if node.op_type not in SHAPE_READERS:
        static = [ctx.is_static(i) for i in ins]
        small = [not st and _small_float(ctx, i) for i, st in zip(ins, static)]
        if not any(static) or not all(a or b for a, b in zip(static, small)):
            return False
        for i, sm in zip(ins, small):
            if sm:
                ctx.values[i] = numpy_helper.to_array(ctx.inits[i])
    if node.op_type == "Shape":
        _shape(ctx, node)
        return True
    values = _evaluate(ctx, node)
    deps = set().union(*(ctx.deps.get(i, set()) for i in ins)) if ins else set()
    if node.op_type == "Size":
        deps |= {(node.input[0], a) for a in range(ctx.rank(node.input[0]))}
    for i, out in enumerate(o for o in node.output if o):
        ctx.deps[out] = deps
        val = values[i] if values is not None else None
        ctx.values[out] = val
        ctx.elems[out] = _elems(ctx, node, i, val)
    return True


def _shape(ctx, node) -> None:
    src = node.input[0]
    rank = ctx.rank(src)
    start = ctx.attr("start", 0)
    end = ctx.attr("end", rank)
    axes = list(range(rank))[slice(start, end)]
    dims = ctx.shape(src)
    ctx.deps[node.output[0]] = {(src, a) for a in axes}
    ctx.values[node.output[0]] = np.array([dims[a] for a in axes], dtype=np.int64)
    ctx.elems[node.output[0]] = [Elem("dim", int(dims[a]), (src, a)) for a in axes]


def _evaluate(ctx, node):
    """Output values of a static node, or ``None`` if they cannot be computed."""
    ins = [ctx.const(i) if i else None for i in node.input]
    if any(v is None for i, v in zip(node.input, ins) if i) and node.op_type != "Size":
        return None
    try:
        if node.op_type == "Size":
            return [np.array(int(np.prod(ctx.shape(node.input[0]))), dtype=np.int64)]
        from onnx.reference import ReferenceEvaluator

        feeds = {name: v for name, v in zip(node.input, ins) if name}
        return ReferenceEvaluator(node).run(None, feeds)
    except Exception:  # an op the reference evaluator lacks: values stay unknown
        return None


def _elems(ctx, node, i, val) -> list[Elem] | None:
    """Provenance of output ``i`` (a small integer vector or scalar)."""
    if val is None or np.ndim(val) > 1 or np.size(val) > 64 or not np.issubdtype(np.asarray(val).dtype, np.integer):
        return None
    flat = np.asarray(val).ravel().tolist()
    derived = [Elem("derived", int(v)) for v in flat]
    if i != 0:
        return derived
    src = [ctx.elems.get(n) if n else None for n in node.input]
    op = node.op_type
    picked = None
    if op in PASS_THROUGH and src and src[0] is not None and len(src[0]) == len(flat):
        picked = list(src[0])
    elif op == "Concat" and all(s is not None for s in src):
        picked = [e for s in src for e in s]
    elif op == "Gather" and src[0] is not None and ctx.attr("axis", 0) == 0:
        idx = np.asarray(ctx.const(node.input[1])).ravel().tolist()
        picked = [src[0][j] for j in idx]
    elif op == "Slice" and src[0] is not None:
        picked = _slice_elems(ctx, node, src[0])
    if picked is None or [e.value for e in picked] != flat:
        return derived
    return picked


def _slice_elems(ctx, node, elems):
    starts, ends = (np.asarray(ctx.const(n)).ravel().tolist() for n in node.input[1:3])
    steps = np.asarray(ctx.const(node.input[4])).ravel().tolist() if len(node.input) > 4 and node.input[4] else [1]
    if len(starts) != 1:
        return None
    return elems[slice(starts[0], ends[0], steps[0])]


def _small_float(ctx, name) -> bool:
    """A float constant of at most one element (a scale in shape arithmetic)."""
    t = ctx.inits.get(name)
    return t is not None and ctx.is_float_init(name) and int(np.prod(t.dims)) <= 1
