"""LayerFold for ONNX: plan on a working copy of the graph, apply on a fresh copy, verify in onnxruntime.

Both passes start from the same *prepared* copy of the model (loaded,
normalised as for pruning: ``Constant`` nodes and ``Identity`` of an
initializer become initializers; unnamed or duplicate node names made
unique), then drop every node that passes its input through (``Identity``,
inference ``Dropout``, and the activations the caller linearises), so the
names a plan records are the names apply finds.  Planning folds to a fixed
point on its copy (BatchNorms into the neighbouring Conv/Gemm/MatMul,
adjacent pairs of linear layers) and records each decision as a
:class:`~graphprune.layerfold.plan.FoldStep` named by ONNX node names.  Applying
replays the applied steps with the float64 numbers of
:mod:`graphprune.layerfold.compose` and re-checks each one on the values
(a step that does not hold is a :class:`PlanError`).

Invariants: the caller's ``ModelProto`` or file is never modified; the
folded model passes ``onnx.checker.check_model(full_check=True)``; its
nodes stay in topological order; initializers nothing reads are dropped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

from ..capture.onnx_load import infer_shapes, input_shapes, load_model, normalise
from ..errors import CaptureError, InvalidArgumentError, PlanError, VerificationError
from ..onnx_api import count_macs_onnx, feeds
from ..verify.onnx_verify import session
from ..verify.oracle import max_diff, scale_of
from .compose import (
    ConvLayer,
    FoldError,
    affine_refusal,
    compose,
    fold_bn,
    layer_macs,
)
from .onnx_layers import ACTIVATIONS, LAYER_OPS, NotALayer, Unit, emit, is_std, read_bn, read_unit
from .plan import FoldPlan, FoldReport, FoldStep, pair_step

__all__ = ["plan_fold_onnx", "apply_fold_onnx", "fold_onnx", "onnx_depth"]


# -- the prepared model and its working graph ---------------------------------------------------------

def _prepare(model_or_path) -> tuple[onnx.ModelProto, int]:
    """A normalised private copy with unique node names, and the node count of the model as given."""
    m = load_model(model_or_path)
    count = len(m.graph.node)
    normalise(m)
    seen: set[str] = set()
    for i, node in enumerate(m.graph.node):
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)
    return m, count


def onnx_depth(model: onnx.ModelProto) -> int:
    """Conv/Gemm/MatMul nodes of ``model`` (its depth in linear layers)."""
    return sum(1 for n in model.graph.node if n.op_type in LAYER_OPS and is_std(n))


def _subgraph_reads(nodes) -> set[str]:
    """Every value read inside a subgraph (If/Loop/Scan bodies may read outer values implicitly)."""
    reads: set[str] = set()
    for node in nodes:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                reads.update(i for n in g.node for i in n.input)
                reads.update(_subgraph_reads(g.node))
    return reads


class _Work:
    """The working graph: an ordered node list, initializers by name, use-def maps rebuilt on every change.

    Invariant: ``nodes`` is in topological order; ``producer`` / ``readers``
    describe ``nodes`` (a graph output or a subgraph read counts as a reader
    that is no node, so a value read that way is never private).
    """

    def __init__(self, model: onnx.ModelProto, shapes: dict | None = None):
        self.model, self.shapes = model, shapes or {}
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.outputs = {o.name for o in g.output}
        self.hidden = _subgraph_reads(self.nodes)
        self.exact: dict[tuple, ConvLayer] = {}  # float64 layers already folded, by unit node names
        self._arrays: dict[str, np.ndarray] = {}
        self.index()

    def index(self) -> None:
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.by_name = {n.name: n for n in self.nodes}
        self._readers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self._readers.setdefault(i, []).append(n)

    def readers(self, value: str) -> list:
        """Nodes reading ``value`` (once per read), plus ``None`` for a graph-output or subgraph read."""
        extra = [None] * ((value in self.outputs) + (value in self.hidden))
        return self._readers.get(value, []) + extra

    def private(self, value: str, reader) -> str | None:
        """Why ``value`` is not read by ``reader`` alone (once), or ``None``."""
        users = self.readers(value)
        if len(users) == 1 and users[0] is reader:
            return None
        outside = " (a graph output or a subgraph reads it)" if None in users else ""
        return f"'{value}' has {len(users)} readers{outside}"

    def position(self, node) -> int:
        return next(i for i, n in enumerate(self.nodes) if n is node)

    def const(self, name: str) -> np.ndarray | None:
        if name not in self.inits:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def unit(self, node) -> Unit | NotALayer | None:
        if node is None:
            return None
        u = read_unit(node, self.const, self.readers)
        if isinstance(u, Unit):
            key = tuple(n.name for n in u.nodes)
            if key in self.exact:
                u = dataclasses.replace(u, layer=self.exact[key])
        return u

    def unit_producing(self, value: str) -> Unit | NotALayer | None:
        """The layer whose output is ``value`` (a MatMul's bias Add included), else ``None``."""
        p = self.producer.get(value)
        if p is None:
            return None
        if p.op_type == "Add" and is_std(p):
            p = next((self.producer.get(i) for i in p.input if self.producer.get(i) is not None
                      and self.producer[i].op_type == "MatMul"), None)
        u = self.unit(p)
        if isinstance(u, Unit) and u.output != value:
            return None
        return u

    def strip(self, linearised: tuple[str, ...]) -> list[str]:
        """Drop pass-through nodes (Identity, inference Dropout, ``linearised``); returns their names.

        Readers of a dropped node's output read its input instead; a node
        whose output is a graph output stays (a linearised one as Identity).
        """
        dropped = []
        for node in list(self.nodes):
            lin = node.name in linearised
            if not (lin or _passthrough(node, self)):
                continue
            src, dst = node.input[0], node.output[0]
            if dst in self.outputs or dst in self.hidden:
                if lin:
                    node.op_type, node.domain = "Identity", ""
                    del node.input[1:], node.output[1:], node.attribute[:]
                continue
            for reader in self._readers.get(dst, []):
                for i, name in enumerate(reader.input):
                    if name == dst:
                        reader.input[i] = src
            del self.nodes[self.position(node)]
            dropped.append(node.name)
            self.index()
        return dropped

    def _names(self, kind: str, base: str) -> str:
        """A free name for a new value / node / initializer (an unread initializer's name is reused)."""
        values = set(self.producer) | {v.name for v in self.model.graph.input} | self.outputs
        if kind == "node":
            taken = set(self.by_name)
        elif kind == "init":
            taken = values | set(self._readers) | self.hidden
        else:
            taken = values | set(self.inits)
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name

    def replace(self, unit: Unit, drop: tuple, layer: ConvLayer, inp: str, out: str) -> None:
        """Put ``layer`` (reading ``inp``, writing ``out``) where ``unit`` was; ``drop`` nodes go too."""
        first = unit.nodes[0]
        gone = {id(n) for n in (*unit.nodes, *drop)}
        at = self.position(first)
        at -= sum(1 for n in self.nodes[:at] if id(n) in gone)
        self.nodes = [n for n in self.nodes if id(n) not in gone]
        names = {n.name for n in (*unit.nodes, *drop)}
        self.exact = {k: v for k, v in self.exact.items() if not names.intersection(k)}
        self.index()
        nodes, inits = emit(unit, layer, inp, out, self._names)
        for t in inits:
            self.inits[t.name] = t
            self._arrays.pop(t.name, None)
        self.nodes[at:at] = nodes
        self.index()
        self.exact[tuple(n.name for n in nodes)] = layer

    def fold_bn(self, unit: Unit, bn, where: str, force: bool) -> None:
        """Fold BatchNorm ``bn`` into ``unit`` (on side ``where``); raises :class:`FoldError` if inexact."""
        gamma, beta, mean, var, eps = read_bn(bn, self.const)
        c = unit.layer.config
        w, b = fold_bn(unit.layer.weight, unit.layer.bias, mean, var, eps, gamma, beta, where, c.groups,
                       c.padding, c.padding_mode, force)
        inp, out = (unit.input, bn.output[0]) if where == "after" else (bn.input[0], unit.output)
        self.replace(unit, (bn,), ConvLayer(w, b, c), inp, out)

    def fold_pair(self, first: Unit, second: Unit, force: bool) -> None:
        """Replace ``second(first(x))`` by one layer in ``first``'s place; :class:`FoldError` if inexact."""
        self.replace(first, second.nodes, compose(first.layer, second.layer, force), first.input, second.output)

    def finish(self) -> onnx.ModelProto:
        """The working graph as a checked model; unread initializers and stale value_info dropped."""
        g = self.model.graph
        del g.node[:]
        g.node.extend(self.nodes)
        read = set(self._readers) | self.hidden | self.outputs
        dead = {name for name in self.inits if name not in read}
        del g.initializer[:]
        g.initializer.extend(t for name, t in self.inits.items() if name not in dead)
        keep_in = [v for v in g.input if v.name not in dead]
        del g.input[:]
        g.input.extend(keep_in)
        keep_vi = [v for v in g.value_info if v.name in self.producer]
        del g.value_info[:]
        g.value_info.extend(keep_vi)
        try:
            onnx.checker.check_model(self.model, full_check=True)
        except Exception as err:
            text = str(err).strip().splitlines()
            raise VerificationError(f"the folded model fails the ONNX checker: {type(err).__name__}: "
                                    f"{text[0][:200] if text else ''}") from err
        return self.model


def _passthrough(node, work: _Work) -> bool:
    """The node hands its first input on unchanged at inference (Identity, Dropout not in training)."""
    if not is_std(node) or len(node.output) < 1 or not node.input or not node.input[0]:
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type != "Dropout" or any(o and work.readers(o) for o in node.output[1:]):
        return False
    if len(node.input) > 2 and node.input[2]:
        mode = work.const(node.input[2])
        return mode is not None and not bool(np.asarray(mode).any())
    return True


def _resolve_linearise(work: _Work, names) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names or ())
    for name in names:
        node = work.by_name.get(name)
        if node is None:
            raise InvalidArgumentError(f"linearise names nothing: the graph has no node '{name}'")
        extra = [i for i in node.input[1:] if i and work.const(i) is None]
        if node.op_type not in ACTIVATIONS or not is_std(node) or extra or len(node.output) != 1:
            raise InvalidArgumentError(f"cannot linearise '{name}' ({node.op_type}): only one-input activations "
                                       f"({', '.join(sorted(ACTIVATIONS))}) act as identity")
    return tuple(dict.fromkeys(names))


# -- planning -------------------------------------------------------------------------------------

class _Planner:
    """Folds on the working graph to a fixed point and records every decision.

    A pass visits nodes in order; a fold rewrites the working graph at once
    (so chains fold left to right).  Passes repeat until one folds nothing;
    its refusals are the ones reported.
    """

    def __init__(self, work: _Work, force: bool, only_if_cheaper: bool):
        self.work, self.force, self.only_if_cheaper = work, force, only_if_cheaper

    def run(self) -> list[FoldStep]:
        steps: list[FoldStep] = []
        while True:
            refused, changed, seen = [], False, set()
            for node in list(self.work.nodes):
                if node.name in seen or node.name not in self.work.by_name:
                    continue  # folded away earlier in this pass
                seen.add(node.name)
                step = self._visit(self.work.by_name[node.name])
                if step is not None:
                    (steps if step.applied else refused).append(step)
                    changed = changed or step.applied
            if not changed:
                return steps + refused

    def _visit(self, node) -> FoldStep | None:
        if node.op_type == "BatchNormalization" and is_std(node):
            return self._norm(node)
        second = self.work.unit(node)
        first = self.work.unit_producing(node.input[0]) if second is not None else None
        if first is None:
            return None
        if isinstance(first, NotALayer) or isinstance(second, NotALayer):
            bad = first if isinstance(first, NotALayer) else second
            return FoldStep(_pair_kind(first, second), (first.name, second.name), "refused", bad.reason)
        return self._pair(first, second)

    def _shape(self, value: str) -> tuple[int, ...]:
        if value not in self.work.shapes:
            raise FoldError(f"no shape is known for '{value}'")
        return self.work.shapes[value]

    def _norm(self, bn) -> FoldStep:
        params = read_bn(bn, self.work.const)
        extra = [o for o in bn.output[1:] if o and self.work.readers(o)]
        reason = params if isinstance(params, str) else (f"'{bn.name}' outputs statistics {extra}" if extra else "")
        if reason:
            return FoldStep("bn", (bn.name,), "refused", reason)
        candidates = [(self.work.unit_producing(bn.input[0]), "after", bn.input[0], bn)]
        users = self.work.readers(bn.output[0])
        if len(users) == 1 and users[0] is not None and users[0].input[0] == bn.output[0]:
            candidates.append((self.work.unit(users[0]), "before", bn.output[0], users[0]))
        refusal = None
        for unit, where, value, reader in candidates:
            if unit is None:
                continue
            step = self._norm_step(unit, bn, where, value, reader, len(params[0]))
            if step.applied:
                return step
            refusal = refusal or step
        users = [u.name if u is not None else "<graph output>" for u in users]
        return refusal or FoldStep("bn", (bn.name,), "refused", f"no conv/linear next to it (reads "
                                                                f"'{bn.input[0]}', read by {users})")

    def _norm_step(self, unit, bn, where: str, value: str, reader, channels: int) -> FoldStep:
        names = (unit.name, bn.name)
        if isinstance(unit, NotALayer):
            return FoldStep("bn", names, "refused", unit.reason, where)
        c = unit.layer.config
        try:
            width = c.out_channels if where == "after" else c.in_channels
            reason = (self.work.private(value, reader) or self._norm_axis(unit, bn)
                      or (f"the norm has {channels} channels, the layer {width}" if width != channels else None))
            macs = layer_macs(c, self._shape(unit.output)) if self.work.shapes else 0
        except FoldError as err:
            reason, macs = str(err), 0
        soft = None if reason else affine_refusal(where, c.padding, c.padding_mode)
        if reason or (soft and not self.force):
            return FoldStep("bn", names, "refused", reason or soft, where)
        self.work.fold_bn(unit, bn, where, force=bool(soft))
        return FoldStep("bn", names, "forced" if soft else "exact", soft or "", where, macs_before=macs,
                        macs_after=macs)

    def _norm_axis(self, unit: Unit, bn) -> str | None:
        rank = len(self._shape(bn.input[0]))
        if rank != unit.layer.config.nd + 2:
            return f"the norm's channel axis is not the layer's channel axis (a rank-{rank} tensor)"
        return None

    def _pair(self, first: Unit, second: Unit) -> FoldStep:
        kind, names = _pair_kind(first, second), (first.name, second.name)
        l1, l2 = first.layer, second.layer
        zero = l1.bias is None or not np.any(l1.bias)
        reason = self.work.private(first.output, second.nodes[0])
        if reason:
            return FoldStep(kind, names, "refused", reason)
        step = pair_step(kind, names, l1.config, l2.config, zero, self._shape(first.output),
                         self._shape(second.output), self.force, self.only_if_cheaper)
        if step.applied:
            self.work.fold_pair(first, second, force=step.status == "forced")
        return step


def _pair_kind(first, second) -> str:
    convs = [getattr(u, "op", None) == "Conv" for u in (first, second)]
    return "conv_pair" if any(convs) else "linear_pair"


def plan_fold_onnx(model_or_path, inputs=None, linearise=(), force: bool = False,
                   only_if_cheaper: bool = True) -> FoldPlan:
    """Decide what to fold in an ONNX model; returns a frozen, JSON-serialisable :class:`FoldPlan`.

    By default: every inference-mode ``BatchNormalization`` into the Conv /
    Gemm / MatMul (constant weight) next to it (after it, or before it when
    the norm's output has no other reader and the conv does not zero-pad),
    and every pair of linear layers that is adjacent (nothing between but
    Identity / inference Dropout), where the value between has one reader.
    ``linearise`` names activation nodes to treat as identity.  Inexact
    candidates stay in the plan as refused, with a reason, unless
    ``force=True`` (moved padding; the caller measures the error).
    ``only_if_cheaper`` refuses a pair whose folded layer costs more MACs
    than the two it replaces.  Steps name ONNX nodes (layer first);
    ``plan.linearised_nodes`` holds ``linearise``.  ``inputs`` (optional)
    fixes the input shapes used for MACs.  The model is not modified.
    """
    m, count = _prepare(model_or_path)
    shapes, _ = infer_shapes(m, input_shapes(m, feeds(m, inputs)))
    work = _Work(m, shapes)
    linearised = _resolve_linearise(work, linearise)
    depth = onnx_depth(m)
    stripped = work.strip(linearised)
    steps = _Planner(work, force, only_if_cheaper).run()
    meta = {"model": m.graph.name or "onnx", "format": "onnx", "force": force, "only_if_cheaper": only_if_cheaper,
            "nodes_before": count, "nodes_after": len(work.nodes), "stripped": len(stripped)}
    return FoldPlan(tuple(steps), (), linearised, False, depth, meta)


# -- apply ----------------------------------------------------------------------------------------

def _find_unit(work: _Work, name: str, step: FoldStep) -> Unit:
    unit = work.unit(work.by_name.get(name))
    if not isinstance(unit, Unit):
        why = unit.reason if isinstance(unit, NotALayer) else "no Conv/Gemm/MatMul node of that name"
        raise PlanError(f"fold plan step '{step}' names layer '{name}', which does not fit the model: {why}")
    return unit


def _replay(work: _Work, step: FoldStep) -> None:
    """Apply one planned step; :class:`PlanError` if the graph is not as the step says."""
    forced = step.status == "forced"
    if step.kind == "bn" and len(step.modules) == 2:
        unit, bn = _find_unit(work, step.modules[0], step), work.by_name.get(step.modules[1])
        if bn is None or bn.op_type != "BatchNormalization" or isinstance(read_bn(bn, work.const), str):
            raise PlanError(f"fold plan step '{step}' expects a foldable BatchNormalization '{step.modules[1]}'")
        ok = (unit.output == bn.input[0]) if step.where == "after" else (unit.input == bn.output[0])
        why = work.private(*((unit.output, bn) if step.where == "after" else (bn.output[0], unit.nodes[0])))
        if not ok or why:
            raise PlanError(f"fold plan step '{step}': '{step.modules[1]}' is not privately {step.where} "
                            f"'{step.modules[0]}' {why or ''}".rstrip())
        work.fold_bn(unit, bn, step.where, forced)
    elif step.kind in ("conv_pair", "linear_pair") and len(step.modules) == 2:
        first, second = (_find_unit(work, name, step) for name in step.modules)
        why = work.private(first.output, second.nodes[0])
        if second.input != first.output or why:
            raise PlanError(f"fold plan step '{step}': '{step.modules[1]}' does not privately read "
                            f"'{step.modules[0]}' {why or ''}".rstrip())
        work.fold_pair(first, second, forced)
    else:
        raise PlanError(f"fold plan step '{step}' is not an ONNX fold (bn, conv_pair, linear_pair)")


def apply_fold_onnx(model_or_path, plan: FoldPlan) -> onnx.ModelProto:
    """A folded copy of the model; the caller's ``ModelProto`` or file is not modified.

    Replays ``plan.folds`` in order on a freshly prepared copy (linearised
    nodes dropped), with float64 arithmetic cast back to each layer's
    element type.  Raises :class:`PlanError` if a step does not fit the
    model (a name it lacks, a fold that is not exact and not forced).  The
    result passes ``onnx.checker.check_model(full_check=True)``.
    """
    if not isinstance(plan, FoldPlan):
        raise InvalidArgumentError(f"plan must be a FoldPlan, got {type(plan).__name__}")
    m, _ = _prepare(model_or_path)
    work = _Work(m)
    missing = [n for n in plan.linearised_nodes if n not in work.by_name]
    if missing:
        raise PlanError(f"fold plan linearises nodes the model does not have: {missing[:5]}")
    work.strip(_resolve_linearise(work, plan.linearised_nodes))
    for step in plan.folds:
        try:
            _replay(work, step)
        except FoldError as err:
            raise PlanError(f"fold plan step '{step}' does not fit the model: {err}") from err
    return work.finish()


# -- plan + apply + verify -------------------------------------------------------------------------

def _outputs(model: onnx.ModelProto, x: dict, what: str) -> list[np.ndarray]:
    try:
        return [np.asarray(o, dtype=np.float64) for o in session(model, threads=1).run(None, x)]
    except Exception as err:
        text = str(err).strip().splitlines()
        raise VerificationError(f"{what} fails to run in onnxruntime: {type(err).__name__}: "
                                f"{text[0][:150] if text else ''}") from err


def fold_onnx(model_or_path, inputs=None, linearise=(), force: bool = False, only_if_cheaper: bool = True,
              rtol: float = 1e-4, atol: float = 0.0) -> tuple[onnx.ModelProto, FoldReport]:
    """Plan, apply and verify a fold of an ONNX model; returns ``(folded_model, report)``.

    The reference is the original model (with the ``linearise``\\ d nodes
    dropped, if any), run in onnxruntime on ``inputs`` (default: seeded
    random feeds, symbolic dimensions set to 1).  The exactly folded model
    must match it within ``atol + rtol * output scale`` or
    :class:`VerificationError` is raised.  With forced steps the exact plan
    is the one checked, and the forced model's deviation is reported as
    ``report.forced_max_abs_diff``.  MACs are :func:`count_macs_onnx`'s
    (both 0 when the IR capture cannot read the model; the fold itself does
    not need it).  Tolerances suit float32/float64 models; pass a larger
    ``rtol`` for float16 ones.
    """
    m = load_model(model_or_path)
    x = feeds(m, inputs)
    plan = plan_fold_onnx(m, x, linearise, force, only_if_cheaper)
    folded = apply_fold_onnx(m, plan)
    reference = apply_fold_onnx(m, dataclasses.replace(plan, steps=())) if plan.linearised_nodes else m
    expected = _outputs(reference, x, "the unfolded model")
    tol = atol + rtol * scale_of(expected)
    diff = max_diff(expected, _outputs(folded, x, "the folded model"))
    forced_diff = None
    if plan.forced:
        forced_diff = diff
        exact = apply_fold_onnx(m, plan_fold_onnx(m, x, linearise, False, only_if_cheaper))
        diff = max_diff(expected, _outputs(exact, x, "the exactly folded model"))
    if not diff <= tol:
        raise VerificationError(f"the folded model differs from the unfolded one by {diff:.3g} "
                                f"(tolerance {tol:.3g}); {plan.summary()}")
    try:
        macs = count_macs_onnx(m, x), count_macs_onnx(folded, x)
    except CaptureError:
        macs = (0, 0)
    return folded, FoldReport(plan, macs[0], macs[1], diff, tol, forced_diff)
