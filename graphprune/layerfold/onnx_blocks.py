"""Removable residual blocks in ONNX graphs: find them, score them, take the least useful out.

A *block* is an ``Add`` node ``y = x + f(x)`` (either input order) where

* ``x`` is an activation (not an initializer), ``f(x)`` is computed by a node,
  and ``x``, ``f(x)`` and ``y`` have the same shape (ONNX shape inference on
  the calibration shapes, measured in onnxruntime where inference has none);
* the *branch* ``f`` -- every node on a path from ``x`` to ``f(x)`` -- reads
  only ``x``, initializers and values it computes itself (a node outside the
  branch, a graph input other than ``x`` or a node holding a subgraph makes it
  no block);
* no value of the branch is read outside it: ``f(x)`` only by the ``Add``,
  the others only by branch nodes (never a graph output or a subgraph).

torchvision's ``BasicBlock`` / ``Bottleneck`` without downsample export as one
such ``Add`` (the ReLU after it reads ``x`` once the block is gone, and ``x``
is itself a ReLU output, so the whole torch block is what goes); a transformer
layer exports as two, its attention and its MLP sub-block, each a block.  A
block whose ``Add`` lies inside another block's branch is *nested*: listings
and reports keep the outermost ones; nested ones can still be named.

Scores (reports ranked ascending, low = removable; the types are the torch
side's :class:`~graphprune.layerfold.blocks.BlockReport` / ``BlockScore``):

* ``"cosine"``, Block Influence: ``1 - cos(x, y)`` averaged over every
  position of every calibration batch, the cosine taken along the channel
  axis: axis 1 when the branch holds a ``Conv`` (ONNX convolutions are
  channels-first), else the last axis when it holds a ``MatMul`` / ``Gemm``
  (``[B, T, C]`` tokens), else axis 1 for rank >= 4 and the last axis
  otherwise (the torch side's rule).  Positions where ``x == y`` score
  exactly 0.  One onnxruntime run per batch, on a copy of the model that
  exposes every block's ``x`` and ``y`` as graph outputs.
* ``"loss"``: the mean squared difference, over every element of every
  floating-point graph output, between the model and the model with the
  block skipped, averaged over the batches (``baseline`` is 0.0).  A copy of
  the model gates each branch (``x + f(x) * g``, ``g`` a scalar graph input
  that is 1, or 0 to skip): one session, one run per block and batch.

Names are the ``Add`` node names of the *prepared* model (the one
:mod:`~graphprune.layerfold.onnx_fold` folds: constants as initializers,
unnamed or duplicate node names made unique), so a report and a removal of
the same model agree.  Invariants: the caller's ``ModelProto`` or file is
never modified; :func:`remove_blocks_onnx` returns a model that passes
``onnx.checker.check_model(full_check=True)``, keeps its nodes in
topological order, drops only the branch nodes and the initializers nothing
reads any more, and (``check=True``) runs with the original's output shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..capture.onnx_load import fresh_name, graph_inputs, infer_shapes, input_shapes, random_inputs
from ..errors import InvalidArgumentError, PlanError, VerificationError
from ..onnx_api import feeds
from ..verify.onnx_verify import session
from .blocks import METHODS, BlockReport, BlockScore, _chosen
from .onnx_fold import _prepare, _subgraph_reads

__all__ = ["OnnxBlock", "find_blocks_onnx", "block_report_onnx", "remove_blocks_onnx", "RANDOM_BATCHES"]

RANDOM_BATCHES = 4  # seeded random feeds used when no calibration data is given
_GATE = "__graphprune_gate"


@dataclass(frozen=True)
class OnnxBlock:
    """One residual block ``output = skip + branch_output`` of a prepared ONNX model."""

    name: str  # the Add node
    skip: str  # x
    branch_output: str  # f(x), the Add's other input
    output: str  # y
    nodes: tuple[str, ...]  # branch nodes, in graph order
    initializers: tuple[str, ...]  # initializers only the branch reads (they go with it)
    params: int  # elements of those initializers
    axis: int  # channel axis of the cosine (non-negative)
    shape: tuple[int, ...]  # of x and y, on the first calibration batch
    op_types: tuple[str, ...]  # of the branch nodes, in graph order

    def summary(self, limit: int = 6) -> str:
        """The branch's op types, e.g. ``Conv+Relu+Conv`` (long branches shortened)."""
        text = "+".join(self.op_types[:limit])
        return text + (f"+... ({len(self.op_types)} nodes)" if len(self.op_types) > limit else "")


# -- the graph and its blocks -------------------------------------------------------------------------

class _Index:
    """Use-def of a model's top-level graph (building it does not change the model).

    ``readers[v]`` lists node indices (once per read); ``outside`` holds the
    values read by a graph output or implicitly by a subgraph.
    """

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = {v.name for v in graph_inputs(model)}
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.readers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for v in n.input:
                self.readers.setdefault(v, []).append(i)
        self.outside = {o.name for o in g.output} | _subgraph_reads(self.nodes)
        self.by_name = {n.name: i for i, n in enumerate(self.nodes)}


def _branch(ix: _Index, add: int, skip: str, out: str) -> set[int] | str:
    """The node indices of ``f`` in ``y = skip + f(skip)`` with ``f(skip) = out``, or why there is none."""
    if skip in ix.inits or (skip not in ix.producer and skip not in ix.inputs):
        return f"'{skip}' is a constant"
    if out == skip or out not in ix.producer:
        return f"'{out}' is not computed from '{skip}'"
    members: set[int] = set()
    stack = [ix.producer[out]]
    while stack:
        i = stack.pop()
        if i in members:
            continue
        node = ix.nodes[i]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return f"the branch holds '{node.name}' ({node.op_type}), which has a subgraph"
        if skip in node.output:
            return f"the branch computes '{skip}' itself"
        members.add(i)
        for v in node.input:
            if not v or v == skip or v in ix.inits:
                continue
            if v not in ix.producer:
                return f"'{out}' depends on the graph input '{v}', not only on '{skip}'"
            stack.append(ix.producer[v])
    if not any(skip in ix.nodes[i].input for i in members):
        return f"'{out}' does not read '{skip}'"
    for i in members:
        for v in ix.nodes[i].output:
            if v in ix.outside:
                return f"the branch value '{v}' is a graph output or read by a subgraph"
            allowed = {add} if v == out else members
            if any(r not in allowed for r in ix.readers.get(v, [])) or (v == out and len(ix.readers[v]) != 1):
                return f"the branch value '{v}' is read outside the branch"
    return members


def _axis(ix: _Index, members: set[int], rank: int) -> int:
    kinds = {ix.nodes[i].op_type for i in members}
    if "Conv" in kinds or ("MatMul" not in kinds and "Gemm" not in kinds and rank >= 4):
        return min(1, rank - 1)
    return rank - 1


def _as_block(ix: _Index, add: int, shapes: dict) -> OnnxBlock | str:
    """The block of ``Add`` node ``add`` (trying both input orders), or why it is none."""
    node = ix.nodes[add]
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return f"'{node.name}' is a {node.op_type} node, not an Add of two inputs"
    reasons = []
    for skip, out in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        members = _branch(ix, add, skip, out)
        if isinstance(members, str):
            reasons.append(members)
            continue
        want = [shapes.get(v) for v in (skip, out, node.output[0])]
        if None in want or len(set(want)) != 1:
            return (f"'{node.name}' changes the shape {list(want[0] or '?')} -> {list(want[2] or '?')} "
                    f"(branch {list(want[1] or '?')}); only shape-preserving blocks can be scored or removed")
        order = sorted(members)
        inits = sorted({v for i in order for v in ix.nodes[i].input if v in ix.inits
                        and v not in ix.outside and all(r in members for r in ix.readers[v])})
        params = sum(int(np.prod(ix.inits[v].dims)) for v in inits)
        return OnnxBlock(node.name, skip, out, node.output[0], tuple(ix.nodes[i].name for i in order),
                         tuple(inits), params, _axis(ix, members, len(want[0])), tuple(want[0]),
                         tuple(ix.nodes[i].op_type for i in order))
    return f"'{node.name}' is not a residual x + f(x): {'; '.join(dict.fromkeys(reasons))}"


def _scan(ix: _Index, shapes: dict) -> tuple[dict[str, OnnxBlock], set[str]]:
    """Every block by Add name, and the names of the nested ones (inside another block's branch)."""
    found = {}
    for i, node in enumerate(ix.nodes):
        if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
            b = _as_block(ix, i, shapes)
            if isinstance(b, OnnxBlock):
                found[b.name] = b
    inner = {n for b in found.values() for n in b.nodes if n in found}
    return found, inner


def _load(model_or_path, batch: dict | None):
    """Prepared model, its index, shapes for ``batch`` (random if None), and the feed used."""
    m, _ = _prepare(model_or_path)
    x = feeds(m, batch)
    shapes, dtypes = infer_shapes(m, input_shapes(m, x))
    return m, _Index(m), shapes, dtypes, x


def find_blocks_onnx(model_or_path, inputs=None) -> tuple[OnnxBlock, ...]:
    """The outermost residual blocks of an ONNX model, in graph order (see the module docstring).

    ``inputs`` fixes the input shapes (default: symbolic dimensions set to 1).
    The model is not modified.
    """
    _, ix, shapes, _, _ = _load(model_or_path, inputs)
    found, inner = _scan(ix, shapes)
    return tuple(b for n, b in found.items() if n not in inner)


def _select(ix: _Index, shapes: dict, names) -> list[OnnxBlock]:
    """The named blocks (or all outermost ones for ``None``); typed errors name the offender."""
    found, inner = _scan(ix, shapes)
    if names is None:
        chosen = [b for n, b in found.items() if n not in inner]
        if not chosen:
            raise PlanError("no residual block (an Add of x and f(x) with the shape of x) found in the graph")
        return chosen
    names = list(names) if isinstance(names, (list, tuple)) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidArgumentError("blocks must be a list of Add node names (strings)")
    if not names:
        raise InvalidArgumentError("blocks is empty: name at least one block, or pass blocks=None")
    chosen = []
    for n in names:
        if n not in ix.by_name:
            raise InvalidArgumentError(f"no node named {n!r} in the graph")
        if names.count(n) > 1:
            raise InvalidArgumentError(f"block {n!r} is named twice")
        b = found.get(n)
        if b is None:
            raise PlanError(f"node {n!r} is no removable block: {_as_block(ix, ix.by_name[n], shapes)}")
        chosen.append(b)
    for b in chosen:
        outer = [o.name for o in chosen if b.name in o.nodes]
        if outer:
            raise InvalidArgumentError(f"block {b.name!r} lies inside block {outer[0]!r}; name only one of them")
    return chosen


# -- scoring --------------------------------------------------------------------------------------

def _batches(m: onnx.ModelProto, calibration, max_batches) -> list[dict]:
    """Calibration feeds ``{input name: array}``; ``None`` gives :data:`RANDOM_BATCHES` seeded random ones."""
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise InvalidArgumentError(f"max_batches must be a positive integer, got {max_batches!r}")
    limit = max_batches or RANDOM_BATCHES
    if calibration is None:
        shapes = input_shapes(m)
        return [random_inputs(m, shapes, seed=s) for s in range(limit)]
    if isinstance(calibration, (dict, np.ndarray)):
        calibration = [calibration]
    if isinstance(calibration, (str, bytes)) or not hasattr(calibration, "__iter__"):
        raise InvalidArgumentError(f"calibration must be a list of feeds ({{input name: array}}), "
                                   f"got {type(calibration).__name__}")
    names = [v.name for v in graph_inputs(m)]
    out = []
    for i, batch in enumerate(calibration):
        if max_batches is not None and i >= max_batches:
            break
        x = feeds(m, batch)
        missing = [n for n in names if n not in x]
        if missing:
            raise InvalidArgumentError(f"calibration batch {i} lacks the model inputs {missing}")
        out.append(x)
    if not out:
        raise InvalidArgumentError("calibration data is empty")
    return out


def _run(sess, names, x: dict, i: int) -> list[np.ndarray]:
    try:
        return sess.run(names, x)
    except Exception as err:
        text = str(err).strip().splitlines()
        raise InvalidArgumentError(f"the model does not run on calibration batch {i}: {type(err).__name__}: "
                                   f"{text[0][:160] if text else ''}") from err


def _one_minus_cosine(x: np.ndarray, y: np.ndarray, axis: int) -> tuple[float, int]:
    """Sum over positions of ``1 - cos`` along ``axis`` (float64), and the number of positions."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    y = np.moveaxis(np.asarray(y, np.float64), axis, -1)
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    nx, ny = np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.clip((x * y).sum(-1) / np.maximum(nx * ny, 1e-300), -1.0, 1.0)
    cos = np.where((x == y).all(-1), 1.0, cos)
    return float((1.0 - cos).sum()), int(cos.size)


def _cosine_scores(m: onnx.ModelProto, blocks: list[OnnxBlock], batches: list[dict]) -> dict[str, float]:
    """Block Influence of every block: one run per batch with every ``x`` and ``y`` exposed."""
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    given = {v.name for v in graph_inputs(m)}
    have = {o.name for o in probe.graph.output}
    names = list(dict.fromkeys(v for b in blocks for v in (b.skip, b.output) if v not in given))
    probe.graph.output.extend(onnx.ValueInfoProto(name=v) for v in names if v not in have)
    sess = session(probe, threads=1)
    sums = {b.name: [0.0, 0] for b in blocks}
    for i, x in enumerate(batches):
        values = {**x, **dict(zip(names, _run(sess, names, x, i)))}
        for b in blocks:
            xa, ya = np.asarray(values[b.skip]), np.asarray(values[b.output])
            if xa.shape != ya.shape:
                raise PlanError(f"block {b.name!r} maps {list(xa.shape)} -> {list(ya.shape)} on calibration "
                                f"batch {i}; only shape-preserving blocks can be scored")
            total, count = _one_minus_cosine(xa, ya, b.axis)
            sums[b.name][0] += total
            sums[b.name][1] += count
    return {n: s / max(c, 1) for n, (s, c) in sums.items()}


def _gated(m: onnx.ModelProto, blocks: list[OnnxBlock], dtypes: dict) -> tuple[onnx.ModelProto, list]:
    """A copy computing ``x + f(x) * g_i`` at every block; ``[(gate input name, numpy dtype)]``."""
    gated = onnx.ModelProto()
    gated.CopyFrom(m)
    g = gated.graph
    taken = {v for n in g.node for v in (*n.input, *n.output)} | {v.name for v in g.input} | {n.name for n in g.node}
    nodes, gates = list(g.node), []
    for j, b in enumerate(blocks):
        gate, out = (fresh_name(f"{_GATE}_{j}{suffix}", taken) for suffix in ("", "_out"))
        dtype = np.dtype(dtypes.get(b.branch_output) or "float32")
        add = next(i for i, n in enumerate(nodes) if n.name == b.name)
        nodes[add].input[list(nodes[add].input).index(b.branch_output)] = out
        nodes.insert(add, helper.make_node("Mul", [b.branch_output, gate], [out], name=out))
        g.input.append(helper.make_tensor_value_info(gate, helper.np_dtype_to_tensor_dtype(dtype), []))
        gates.append((gate, dtype))
    del g.node[:]
    g.node.extend(nodes)
    return gated, gates


def _loss_scores(m: onnx.ModelProto, blocks: list[OnnxBlock], batches: list[dict], dtypes: dict):
    """Mean squared change of the float outputs when each block is skipped (gate 0), per block."""
    gated, gates = _gated(m, blocks, dtypes)
    sess = session(gated, threads=1)
    outs = [o.name for o in m.graph.output]
    totals = {b.name: 0.0 for b in blocks}
    for i, x in enumerate(batches):
        ones = {name: np.ones((), dtype) for name, dtype in gates}
        ref = [np.asarray(a, np.float64) for a in _run(sess, outs, {**x, **ones}, i)
               if np.issubdtype(np.asarray(a).dtype, np.floating)]
        size = max(sum(a.size for a in ref), 1)
        for b, (gate, dtype) in zip(blocks, gates):
            got = [np.asarray(a, np.float64) for a in _run(sess, outs, {**x, **ones, gate: np.zeros((), dtype)}, i)
                   if np.issubdtype(np.asarray(a).dtype, np.floating)]
            totals[b.name] += sum(float(np.square(p - q).sum()) for p, q in zip(got, ref)) / size
    return {n: t / len(batches) for n, t in totals.items()}


def block_report_onnx(model_or_path, calibration=None, method: str = "cosine", max_batches: int | None = None,
                      blocks=None) -> BlockReport:
    """Score the residual blocks of an ONNX model on calibration data (see the module docstring).

    ``calibration``: a list of feeds (each ``{input name: array}``, or an
    array / list of arrays as :func:`graphprune.onnx_api.feeds` takes), one
    feed (a dict or an array), or ``None`` for :data:`RANDOM_BATCHES` seeded random feeds (symbolic
    dimensions 1); at most ``max_batches`` are used.  ``blocks``: ``None``
    scores every outermost block, else a list of ``Add`` node names (a node
    that is no block raises :class:`PlanError` saying why).  Returns the
    torch side's :class:`BlockReport`, ranked by ascending score; its rows
    have ``container_kind="onnx"``, ``index`` = the ``Add``'s node position,
    ``type`` = the branch's ops, ``params`` = the branch's own initializer
    elements.  The model is not modified.
    """
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}")
    m, _ = _prepare(model_or_path)
    batches = _batches(m, calibration, max_batches)
    shapes, dtypes = infer_shapes(m, input_shapes(m, batches[0]))
    ix = _Index(m)
    chosen = _select(ix, shapes, blocks)
    if method == "cosine":
        scores, baseline = _cosine_scores(m, chosen, batches), None
    else:
        scores, baseline = _loss_scores(m, chosen, batches, dtypes), 0.0
    rows = [BlockScore(name=b.name, container="", index=ix.by_name[b.name], container_kind="onnx",
                       type=b.summary(), score=float(scores[b.name]), in_shape=b.shape, out_shape=b.shape,
                       params=b.params) for b in chosen]
    rows.sort(key=lambda r: r.score)
    return BlockReport(method=method, baseline=baseline, entries=tuple(rows))


# -- removal --------------------------------------------------------------------------------------

def _rewrite(m: onnx.ModelProto, ix: _Index, chosen: list[OnnxBlock]) -> onnx.ModelProto:
    """Drop the chosen blocks in place: readers of ``y`` read ``x`` (an ``Identity`` keeps a ``y`` that a
    graph output or a subgraph reads); initializers only dropped nodes read go too."""
    g = m.graph
    drop = {ix.by_name[n] for b in chosen for n in b.nodes}
    rename, kept_as_identity = {}, {}
    for b in chosen:
        if b.output in ix.outside:
            kept_as_identity[b.name] = b
        else:
            rename[b.output] = b.skip
            drop.add(ix.by_name[b.name])

    def resolve(v: str) -> str:
        while v in rename:
            v = rename[v]
        return v

    nodes = []
    for i, node in enumerate(ix.nodes):
        if i in drop:
            continue
        if node.name in kept_as_identity:
            b = kept_as_identity[node.name]
            node = helper.make_node("Identity", [b.skip], [b.output], name=node.name)
        for j, v in enumerate(node.input):
            node.input[j] = resolve(v)
        nodes.append(node)
    read = {v for n in nodes for v in n.input} | ix.outside
    dead = {v for i in drop for v in ix.nodes[i].input if v in ix.inits and v not in read}
    produced = {v for n in nodes for v in n.output}
    keep_init = [t for t in g.initializer if t.name not in dead]
    keep_in = [v for v in g.input if v.name not in dead]
    keep_vi = [v for v in g.value_info if v.name in produced]
    for field, keep in ((g.node, nodes), (g.initializer, keep_init), (g.input, keep_in), (g.value_info, keep_vi)):
        del field[:]
        field.extend(keep)
    return m


def _check_valid(slim: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(slim, full_check=True)
    except Exception as err:
        text = str(err).strip().splitlines()
        raise VerificationError(f"the model with blocks removed fails the ONNX checker: {type(err).__name__}: "
                                f"{text[0][:200] if text else ''}") from err


def _check_runs(original: onnx.ModelProto, slim: onnx.ModelProto, x: dict) -> None:
    """Both run in onnxruntime on ``x`` and give outputs of equal shapes, else a typed error."""
    shapes = []
    for what, model in (("the original model", original), ("the model with blocks removed", slim)):
        try:
            shapes.append([np.shape(o) for o in session(model, threads=1).run(None, x)])
        except Exception as err:
            text = str(err).strip().splitlines()
            raise VerificationError(f"{what} fails to run in onnxruntime: {type(err).__name__}: "
                                    f"{text[0][:150] if text else ''}") from err
    if shapes[0] != shapes[1]:
        raise PlanError(f"removing the blocks changed the output shapes {shapes[0]} -> {shapes[1]}")


def remove_blocks_onnx(model_or_path, report_or_names, k: int | None = None, inputs=None,
                       check: bool = True) -> onnx.ModelProto:
    """A copy of the ONNX model without the chosen residual blocks (the caller's model or file is untouched).

    ``report_or_names``: a :class:`BlockReport` of :func:`block_report_onnx`
    (its ``k`` lowest-scoring blocks go; ``k`` is required) or ``Add`` node
    names (all of them, or the first ``k``).  Every reader of a block's ``y``
    reads its ``x`` instead; the branch nodes, the ``Add`` and the
    initializers nothing reads any more are dropped.  The result passes
    ``onnx.checker.check_model(full_check=True)``; with ``check`` it is run
    in onnxruntime once on ``inputs`` (default: seeded random feeds) next to
    the original and must give the same output shapes.  Errors are
    :class:`InvalidArgumentError` (bad ``k``, unknown or repeated names) or
    :class:`PlanError` (a node that is no removable block, with the reason).
    """
    names, report = _chosen(report_or_names, k)
    if report is not None and any(e.container_kind != "onnx" for e in report.entries):
        raise InvalidArgumentError("the report scores PyTorch modules; score the ONNX model with "
                                   "block_report_onnx")
    m, _ = _prepare(model_or_path)
    original = onnx.ModelProto()
    original.CopyFrom(m)
    x = feeds(m, inputs)
    chosen = []
    if names:
        shapes, _ = infer_shapes(m, input_shapes(m, x))
        ix = _Index(m)
        chosen = _select(ix, shapes, names)
        _rewrite(m, ix, chosen)
    _check_valid(m)
    if check:
        _check_runs(original, m, x)
    return m

