"""LayerFold for PyTorch: plan on an fx trace, then apply on a copy, then verify.

Planning traces the model (in eval mode; its mode is restored) with
``torch.fx``, records shapes with ``ShapeProp``, drops every node that acts
as identity (``nn.Identity``, dropout in eval mode, the activations the
caller linearises) and folds to a fixed point on that working graph:
BatchNorms into their neighbouring conv/linear, adjacent conv/linear pairs,
and residuals ``x + f(x)``.  Each decision is a :class:`FoldStep`.
Planning needs no weights: configs, shapes and whether a bias is exactly
zero decide exactness and cost.  Applying replays the steps on a fresh copy
with the float64 numbers of :mod:`graphprune.layerfold.compose` and re-checks
every step on the values (a step that does not hold is a
:class:`PlanError`).

Invariants: the caller's model is never modified; the folded model is an
inference model (eval mode); module-level rewrites keep the model's class,
and only graph surgery (removing a functional activation or a residual add)
yields a ``torch.fx.GraphModule``.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..capture.torch_fx import as_args
from ..errors import CaptureError, InvalidArgumentError, PlanError, VerificationError
from ..metrics import count_macs
from ..verify.oracle import max_diff, scale_of
from ..verify.torch_verify import run
from .compose import FoldError, layer_macs, residual_refusal
from .plan import FoldPlan, FoldReport, FoldStep, pair_step
from .torch_layers import NumericState, Sketches, is_layer, is_norm, is_passthrough, set_module, to_layer, to_module

__all__ = ["plan_fold", "apply_fold", "fold", "to_layer", "to_module"]

ADDS = (operator.add, operator.iadd, torch.add)


# -- fx helpers -----------------------------------------------------------------------------------

def _positional(inputs) -> tuple:
    args, kwargs = as_args(inputs)
    if kwargs:
        raise InvalidArgumentError("fold takes positional example inputs (a tensor or a tuple of tensors)")
    return args


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as err:
        text = str(err).strip().splitlines()
        raise CaptureError(f"cannot fold {type(model).__name__}: torch.fx cannot trace it "
                           f"({type(err).__name__}: {text[0][:150] if text else ''})") from err


def _propagate(gm: fx.GraphModule, args: tuple) -> None:
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as err:
        raise CaptureError(f"cannot fold {type(gm).__name__}: shape propagation failed "
                           f"({type(err).__name__}: {str(err).strip()[:150]})") from err


def _shape(node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if not hasattr(meta, "shape"):
        raise FoldError(f"no tensor shape recorded for '{getattr(node, 'name', node)}'")
    return tuple(meta.shape)


def _uses(gm: fx.GraphModule) -> Counter:
    """Calls per module, plus reads of its parameters through ``get_attr``."""
    uses = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            uses[n.target] += 1
        elif n.op == "get_attr":
            uses[n.target.rpartition(".")[0]] += 1
    return uses


def _unary(node: fx.Node) -> bool:
    return bool(node.args) and isinstance(node.args[0], fx.Node) and len(node.all_input_nodes) == 1


def _resolve_linearise(gm: fx.GraphModule, names) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split ``names`` into module qualified names (every call) and fx node names."""
    names = (names,) if isinstance(names, str) else tuple(names)
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    nodes = {n.name: n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")}
    mods, fns = [], []
    for name in names:
        node = calls.get(name) or nodes.get(name)
        if node is None:
            raise InvalidArgumentError(f"linearise names nothing: '{name}' is neither a called module nor an "
                                       f"fx node of {type(gm).__name__}")
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not _unary(node) or is_layer(module) or is_norm(module):
            raise InvalidArgumentError(f"cannot linearise '{name}': only one-input activations act as identity")
        (mods if name in calls else fns).append(name)
    return tuple(dict.fromkeys(mods)), tuple(dict.fromkeys(fns))


def _strip(gm: fx.GraphModule, drop: Callable[[fx.Node], bool]) -> None:
    """Remove every node for which ``drop`` holds; its readers read its input instead."""
    for node in list(gm.graph.nodes):
        if drop(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _identity_like(gm: fx.GraphModule, linearised: tuple[str, ...]) -> Callable[[fx.Node], bool]:
    def drop(node: fx.Node) -> bool:
        if node.op != "call_module" or not _unary(node) or node.kwargs or len(node.args) != 1:
            return False
        return node.target in linearised or is_passthrough(gm.get_submodule(node.target))
    return drop


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in ADDS)
            or (node.op == "call_method" and node.target in ("add", "add_")))


def _rewire(gm: fx.GraphModule, step: FoldStep) -> None:
    """The graph side of an applied ``step``, shared by planning and apply: the absorbed node goes.

    Pair / norm after: readers of the second node read the first.  Norm
    before: the layer reads the norm's input.  Residual: readers of the add
    read the layer.  Raises :class:`PlanError` if a node is not where the
    step says.
    """
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    if step.kind == "residual":
        add = next((n for n in gm.graph.nodes if step.nodes and n.name == step.nodes[0]), None)
        layer = calls.get(step.modules[0])
        if add is None or not _is_add(add) or layer not in add.args:
            raise PlanError(f"fold plan expects add '{step.nodes[:1]}' reading '{step.modules[0]}' in the graph")
        add.replace_all_uses_with(layer)
        gm.graph.erase_node(add)
        return
    first, second = calls.get(step.modules[0]), calls.get(step.modules[1])
    if first is None or second is None:
        raise PlanError(f"fold plan step '{step}' names a module the traced graph does not call")
    if step.kind == "bn" and step.where == "before":
        first.replace_input_with(second, second.args[0])
    else:
        if "tensor_meta" in second.meta:
            first.meta["tensor_meta"] = second.meta["tensor_meta"]
        second.replace_all_uses_with(first)
    gm.graph.erase_node(second)


# -- planning -------------------------------------------------------------------------------------

class _Planner:
    """Folds on a working fx graph to a fixed point and records every decision.

    A pass visits nodes in topological order; a fold rewrites the working
    graph at once (so chains fold left to right).  Passes repeat until one
    folds nothing; its refusals are the ones reported.
    """

    def __init__(self, gm: fx.GraphModule, uses: Counter, force: bool, only_if_cheaper: bool, residual: bool):
        self.gm, self.uses = gm, uses
        self.force, self.only_if_cheaper, self.residual = force, only_if_cheaper, residual
        self.state = Sketches(gm.get_submodule)

    def run(self) -> list[FoldStep]:
        steps: list[FoldStep] = []
        while True:
            refused, changed = [], False
            for node in list(self.gm.graph.nodes):  # a fold erases only the node being visited
                step = self._visit(node)
                if step is not None:
                    (steps if step.applied else refused).append(step)
                    changed = changed or step.applied
            if not changed:
                return steps + refused

    def _visit(self, node: fx.Node) -> FoldStep | None:
        if node.op == "call_module" and is_norm(self.gm.get_submodule(node.target)):
            return self._norm(node)
        if self._is_layer_node(node) and self._is_layer_node(node.args[0]):
            return self._pair(node.args[0], node)
        if self.residual and _is_add(node):
            return self._residual(node)
        return None

    def _is_layer_node(self, node) -> bool:
        return (isinstance(node, fx.Node) and node.op == "call_module" and len(node.args) == 1
                and not node.kwargs and is_layer(self.gm.get_submodule(node.target)))

    def _exclusive(self, a: fx.Node, b: fx.Node) -> str | None:
        """Why ``a -> b`` is not a private edge between modules called once, or ``None``."""
        if len(a.users) != 1:
            return f"the output of '{a.name}' has {len(a.users)} readers"
        for n in (a, b):
            if n.op == "call_module" and self.uses[n.target] != 1:
                return f"module '{n.target}' is used {self.uses[n.target]} times"
        return None

    def _commit(self, step: FoldStep) -> FoldStep | str:
        """Replay and rewire ``step``; forced if only ``force`` makes it possible; else the reason."""
        try:
            self.state.replay(step)
        except FoldError as err:
            if not self.force or step.status == "forced":
                return str(err)
            step = dataclasses.replace(step, status="forced", reason=str(err))
            try:
                self.state.replay(step)
            except FoldError as err2:
                return str(err2)
        _rewire(self.gm, step)
        return step

    def _norm(self, node: fx.Node) -> FoldStep:
        bn, name, src = self.gm.get_submodule(node.target), node.target, node.args[0]
        if bn.running_mean is None or bn.running_var is None:
            return FoldStep("bn", (name,), "refused", "uses batch statistics (track_running_stats=False)")
        users = list(node.users)
        candidates = [(src, "after")] if self._is_layer_node(src) else []
        if len(users) == 1 and self._is_layer_node(users[0]):
            candidates.append((users[0], "before"))
        refusal = None
        for layer, where in candidates:
            pair = (src, node) if where == "after" else (node, layer)
            names = (layer.target, name)
            try:
                reason = self._exclusive(*pair) or self._norm_axis(layer, node)
            except FoldError as err:
                reason = str(err)
            step = reason or self._commit(FoldStep("bn", names, "exact", where=where))
            if isinstance(step, FoldStep):
                return self._with_macs(step, layer)
            refusal = refusal or FoldStep("bn", names, "refused", step, where)
        reads = src.name if isinstance(src, fx.Node) else src
        return refusal or FoldStep("bn", (name,), "refused", f"no conv/linear next to it (reads '{reads}', "
                                                              f"read by {[u.name for u in users]})")

    def _norm_axis(self, layer: fx.Node, norm: fx.Node) -> str | None:
        shape = _shape(norm.args[0])
        if len(shape) != self.state.get(layer.target).config.nd + 2:
            return f"the norm's channel axis is not the layer's channel axis (tensor shape {list(shape)})"
        return None

    def _with_macs(self, step: FoldStep, layer: fx.Node) -> FoldStep:
        macs = layer_macs(self.state.get(step.modules[0]).config, _shape(layer))
        return dataclasses.replace(step, macs_before=macs, macs_after=macs)

    def _pair(self, a: fx.Node, b: fx.Node) -> FoldStep:
        both_linear = type(self.gm.get_submodule(a.target)) is type(self.gm.get_submodule(b.target)) is nn.Linear
        kind, names = ("linear_pair" if both_linear else "conv_pair"), (a.target, b.target)
        try:
            la, lb = self.state.get(a.target), self.state.get(b.target)
        except FoldError as err:
            return FoldStep(kind, names, "refused", str(err))
        reason = self._exclusive(a, b)
        if reason:
            return FoldStep(kind, names, "refused", reason)
        step = pair_step(kind, names, la.config, lb.config, la.bias_zero, _shape(a), _shape(b),
                         self.force, self.only_if_cheaper)
        if not step.applied:
            return step
        done = self._commit(step)
        return dataclasses.replace(step, status="refused", reason=done) if isinstance(done, str) else done

    def _residual(self, add: fx.Node) -> FoldStep | None:
        if add.kwargs or len(add.args) != 2:
            return None
        for skip, f in (add.args, add.args[::-1]):
            if not (self._is_layer_node(f) and f.args[0] is skip):
                continue
            try:
                if not _shape(f) == _shape(skip) == _shape(add):
                    return None  # a broadcasting add is not x + f(x)
                macs = layer_macs(self.state.get(f.target).config, _shape(f))
                reason = self._exclusive(f, add) or residual_refusal(self.state.get(f.target).config)
            except FoldError as err:
                reason, macs = str(err), 0
            step = FoldStep("residual", (f.target,), "exact", nodes=(add.name,), macs_before=macs, macs_after=macs)
            step = reason or self._commit(step)
            if isinstance(step, str):
                return FoldStep("residual", (f.target,), "refused", step, nodes=(add.name,))
            return step
        return None


def plan_fold(model: nn.Module, example_inputs, linearise=(), force: bool = False, only_if_cheaper: bool = True,
              residual: bool = True) -> FoldPlan:
    """Decide what to fold in ``model``; returns a frozen, JSON-serialisable :class:`FoldPlan`.

    By default: every BatchNorm into its adjacent conv/linear, and every pair
    of conv/linear layers that is already adjacent (nothing between but
    ``nn.Identity`` or dropout), where the value between has one reader and
    both modules are called once; ``x + f(x)`` with ``f`` one layer becomes
    ``W + I`` (``residual=False`` turns that off).  ``linearise`` names
    activations (module qualified names, or fx node names of functional
    calls such as ``relu``) to treat as identity.  Inexact candidates are
    kept in the plan as refused, with a reason, unless ``force=True`` (moved
    padding; the caller measures the error).  ``only_if_cheaper`` refuses a
    pair fold whose layer costs more MACs than the two it replaces.  The
    model is not modified (it is traced and run in eval mode, then its mode
    is restored; planning rewrites only its own fx graph).
    """
    args = _positional(example_inputs)
    was = model.training
    try:  # the trace shares the model's modules; eval mode so no statistics change
        gm = _trace(model.eval())
        _propagate(gm, args)
    finally:
        model.train(was)
    uses = _uses(gm)
    mods, nodes = _resolve_linearise(gm, linearise)
    depth = sum(1 for n in gm.graph.nodes if n.op == "call_module" and is_layer(gm.get_submodule(n.target)))
    identity = _identity_like(gm, mods)
    _strip(gm, lambda n: n.name in nodes or identity(n))
    steps = _Planner(gm, uses, force, only_if_cheaper, residual).run()
    graph = bool(nodes) or any(s.kind == "residual" and s.applied for s in steps)
    meta = {"model": type(model).__name__, "force": force, "only_if_cheaper": only_if_cheaper, "residual": residual}
    return FoldPlan(tuple(steps), mods, nodes, graph, depth, meta)


# -- apply ----------------------------------------------------------------------------------------

_EXPECTED = {"bn": ("conv/linear", "BatchNorm"), "linear_pair": ("Linear", "Linear"),
             "conv_pair": ("conv", "conv"), "residual": ("conv/linear",)}


def _check_step(root: nn.Module, step: FoldStep) -> None:
    for name, what in zip(step.modules, _EXPECTED[step.kind]):
        try:
            module = root.get_submodule(name)
        except AttributeError as err:
            raise PlanError(f"fold plan names '{name}', which {type(root).__name__} does not have") from err
        if not (is_norm(module) if what == "BatchNorm" else is_layer(module)):
            raise PlanError(f"fold plan expects '{name}' to be a {what}, found {type(module).__name__}")


def apply_fold(model: nn.Module, plan: FoldPlan) -> nn.Module:
    """A folded copy of ``model`` (eval mode); ``model`` itself is not modified.

    Module-level plans return the model's own class (folded layers replaced,
    absorbed norms/layers and linearised modules set to ``nn.Identity``).
    When ``plan.graph_module`` is set (a functional activation or a residual
    add must go) the result is a ``torch.fx.GraphModule`` without those
    nodes.  Raises :class:`PlanError` if the plan does not fit the model.
    """
    root = copy.deepcopy(model).eval()
    if plan.graph_module:
        root = _trace(root)
        nodes = set(plan.linearised_nodes)
        identity = _identity_like(root, plan.linearised_modules)
        _strip(root, lambda n: n.name in nodes or identity(n))  # the graph planning started from
    state = NumericState(root.get_submodule)
    for step in plan.folds:
        _check_step(root, step)
        try:
            state.replay(step)
        except FoldError as err:
            raise PlanError(f"fold plan step '{step}' does not fit {type(model).__name__}: {err}") from err
        if plan.graph_module:
            _rewire(root, step)
    if not plan.graph_module:
        for name in plan.linearised_modules:
            set_module(root, name, nn.Identity())
    state.install(root)
    if plan.graph_module:
        root.graph.lint()
        root.recompile()
        root.delete_all_unused_submodules()
    return root


# -- plan + apply + verify -------------------------------------------------------------------------

def _outputs(model: nn.Module, inputs, what: str) -> list[np.ndarray]:
    try:
        return [o.astype(np.float64) for o in run(model, inputs)]
    except Exception as err:
        raise VerificationError(f"{what} fails to run: {type(err).__name__}: {str(err).strip()[:150]}") from err


def fold(model: nn.Module, example_inputs, linearise=(), force: bool = False, only_if_cheaper: bool = True,
         residual: bool = True, rtol: float = 1e-4, atol: float = 0.0) -> tuple[nn.Module, FoldReport]:
    """Plan, apply and verify a fold; returns ``(folded_model, report)``.

    The reference is the unfolded model with the same activations
    linearised.  The exactly folded model must match it within
    ``atol + rtol * output scale`` or :class:`VerificationError` is raised.
    With forced steps, the exact plan (same options, ``force=False``) is the
    one checked, and the returned forced model's deviation is reported as
    ``report.forced_max_abs_diff``.  The folded model may be a
    ``torch.fx.GraphModule`` (see :func:`apply_fold`).
    """
    plan = plan_fold(model, example_inputs, linearise, force, only_if_cheaper, residual)
    folded = apply_fold(model, plan)
    unfolded = dataclasses.replace(plan, steps=(), graph_module=bool(plan.linearised_nodes))
    expected = _outputs(apply_fold(model, unfolded), example_inputs, "unfolded model")
    tol = atol + rtol * scale_of(expected)
    diff = max_diff(expected, _outputs(folded, example_inputs, "folded model"))
    forced_diff = None
    if plan.forced:
        forced_diff = diff
        exact = apply_fold(model, plan_fold(model, example_inputs, linearise, False, only_if_cheaper, residual))
        diff = max_diff(expected, _outputs(exact, example_inputs, "exactly folded model"))
    if not diff <= tol:
        raise VerificationError(f"folded {type(model).__name__} differs from the unfolded model by {diff:.3g} "
                                f"(tolerance {tol:.3g}); {plan.summary()}")
    report = FoldReport(plan, count_macs(model, example_inputs), count_macs(folded, example_inputs), diff, tol,
                        forced_diff)
    return folded, report
