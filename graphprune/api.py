"""The public API: thin functions over capture -> coupling -> scoring ->
planning -> apply -> verify.  Arguments are validated here, once, with one
message template; the user's model is never modified unless ``inplace=True``.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn

from .apply.compensate import compensate as _compensate
from .apply.hf_config import module_widths, update_config
from .apply.torch_apply import apply_torch
from .calibration import Calibration, activation_statistics, gradient_statistics, norm_modules
from .capture.torch_fx import capture_torch
from .checks import bad as _bad
from .checks import check_allocation, check_budget, check_ratio, check_round_to
from .coupling.groups import Coupling, couple
from .errors import InvalidArgumentError
from .ir.query import normalised_sums
from .latency import LatencyModel
from .metrics import count_macs, count_params
from .planning.budget import make_plan
from .planning.plan import PruningPlan
from .scoring.importance import StatArrays, get_importance
from .verify.torch_verify import VerifyReport, verify_torch


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise _bad("model", "a torch.nn.Module", type(model).__name__)


def resolve_ignore(model: nn.Module, ignore) -> set[str]:
    """Qualified parameter names owned by the ignored modules or names."""
    if ignore is None:
        return set()
    if isinstance(ignore, (nn.Module, str)):
        ignore = [ignore]
    params = dict(model.named_parameters())
    modules = {id(m): n for n, m in model.named_modules()}
    module_names = {n for n, _ in model.named_modules()}
    out: set[str] = set()
    for item in ignore:
        if isinstance(item, nn.Module):
            if id(item) not in modules:
                raise _bad("ignore", "submodules of the model", type(item).__name__)
            prefix = modules[id(item)]
        elif isinstance(item, str):
            if item in params:
                out.add(item)
                continue
            if item not in module_names:
                raise InvalidArgumentError(
                    f"ignore names '{item}', which is neither a module nor a parameter of {type(model).__name__}")
            prefix = item
        else:
            raise _bad("ignore", "modules or qualified names", item)
        out.update(n for n in params if prefix == "" or n == prefix or n.startswith(prefix + "."))
    return out


class _Eval:
    """Put a model in eval mode for capture and restore every module's flag."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


@contextlib.contextmanager
def _gc_paused():
    """Capture, coupling and apply make many small objects that live until the
    stage ends; a full collection over a large model's heap in the middle frees
    nothing and costs about 0.5 s on a 48-layer LLaMA, so it waits for the end."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def analyze(model: nn.Module, example_inputs, ignore=None, strict: bool = False) -> Coupling:
    """Capture ``model`` and return its coupled groups (model untouched)."""
    _check_model(model)
    fixed = resolve_ignore(model, ignore)
    with _Eval(model), _gc_paused():
        captured = capture_torch(model, example_inputs)
        captured.graph.lint()
        result = couple(captured.graph, strict=strict, fixed_params=fixed)
    result.method = captured.method
    return result


class _LazyArrays(dict):
    """Parameter arrays as numpy, converted on first access."""

    def __init__(self, model):
        super().__init__()
        self._tensors = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}

    def __missing__(self, key):
        t = self._tensors[key]
        if t.is_meta:
            raise InvalidArgumentError(f"the criterion reads weights, but '{key}' is on the meta device "
                                       f"(no data): use importance='random' or load the weights")
        arr = t.detach().cpu().float().numpy()
        self[key] = arr
        return arr


def plan(model: nn.Module, example_inputs, ratio: float | None = None, importance=None,
         ignore: Iterable | None = None, round_to: int = 1, strict: bool = False,
         macs: float | None = None, params: float | None = None, allocation: str | None = None,
         normalizer: str | None = None, max_ratio: float = 0.9, calibration=None, max_batches: int | None = None,
         loss_fn=None, latency: float | None = None, heads: float = 0.0, hidden: float = 0.0) -> PruningPlan:
    """Decide what to remove (the model is untouched).

    One budget: ``ratio`` (fraction of every group's units to remove, default
    0.5), or ``macs`` / ``params`` (fraction of the dense model to keep,
    met by the smallest ratio that reaches it).  ``allocation="global"``
    ranks all units together (scores normalised per group by ``normalizer``,
    at most ``max_ratio`` of any group removed) instead of one ratio per group
    (``"local"``).  ``None``, the default, is global without a normaliser
    when the criterion's scores mean the same in every group and it scored
    every group itself (``reconstruction`` given calibration data: errors
    in the same units everywhere), else local (``normalizer`` ``"mean"``).
    ``importance=None`` (the default) is ``"l2"`` without calibration data
    and ``"reconstruction"`` with it (the output error each unit's removal
    leaves at the layers that read it after least-squares compensation, the
    default of :func:`apply`; :mod:`graphprune.scoring.reconstruction`).
    Data-driven criteria (``reconstruction``, ``taylor``, ``obd``,
    ``activation``, ``wanda``) need ``calibration`` batches;
    ``loss_fn(output)`` overrides the label-free default loss.  ``latency``
    keeps that fraction of the weight layers' onnxruntime latency, measured
    per layer on this machine and cached (:mod:`graphprune.latency`).
    ``heads`` is the fraction of whole attention heads to remove in every
    attention layer (with grouped-query attention a unit is a KV head with
    its query heads); ``hidden`` the fraction of the residual-stream width
    of transformers (embeddings, norms, every projection; lossy through the
    norm statistics, which ``verify`` reports).  Given alone, either keeps
    channels (``ratio=0``).
    """
    heads, hidden = check_ratio(heads, "heads"), check_ratio(hidden, "hidden")
    if (heads or hidden) and ratio is macs is params is latency is None:
        ratio = 0.0
    kind, value = check_budget(ratio, macs, params, latency)
    check_allocation(allocation or "local", normalizer or "mean", max_ratio)
    round_to = check_round_to(round_to)
    scorer = get_importance(default_importance(calibration) if importance is None else importance)
    coupling = analyze(model, example_inputs, ignore, strict)
    meta = {"model": type(model).__name__, "ratio": value if kind == "ratio" else None,
            "importance": getattr(scorer, "name", "custom"), "round_to": round_to, "capture": coupling.method,
            "barriers": coupling.barriers, "norm_inputs": normalised_sums(coupling.graph)}
    arrays = _LazyArrays(model)
    if scorer.statistic != "weight":
        if calibration is None:
            raise InvalidArgumentError(f"importance '{scorer.name}' needs calibration= batches")
        data = Calibration(calibration, max_batches)
        consumers = {m.param for g in coupling.groups if g.n_prunable for m in g.members if m.role == "in"}
        stats = (gradient_statistics(model, data, scorer.statistic, loss_fn)
                 if scorer.statistic in ("taylor", "fisher")
                 else activation_statistics(model, data, scorer.statistic, consumers,
                                            norm_modules(model, meta["norm_inputs"],
                                                         {c.rpartition(".")[0] for c in consumers})))
        arrays = StatArrays(stats, arrays)
    comparable = getattr(scorer, "comparable", False) and all(
        scorer.covers(g, arrays) for g in coupling.groups if g.n_prunable)
    alloc = check_allocation(allocation, normalizer, max_ratio, comparable)
    measure = LatencyModel() if kind == "latency" else None
    return make_plan(coupling, arrays, scorer, kind, value, round_to, meta, measure=measure, heads=heads,
                     hidden=hidden, **alloc)


def default_importance(calibration) -> str:
    """The criterion ``importance=None`` means: ``"reconstruction"`` given calibration data, else ``"l2"``."""
    return "l2" if calibration is None else "reconstruction"


def apply(model: nn.Module, plan: PruningPlan, inplace: bool = False, calibration=None,
          compensation: str | None = None, max_batches: int | None = None) -> nn.Module:
    """Return a physically smaller model of the same class.

    With ``calibration`` batches the default compensation (``"lstsq"``, see
    :func:`compensate`) corrects the layers that read pruned channels;
    ``compensation="bias"`` or ``"none"`` choose otherwise.  ``verify``
    proves the rewrite itself: call it on ``apply(model, plan)``.
    """
    _check_model(model)
    if not isinstance(plan, PruningPlan):
        raise _bad("plan", "a PruningPlan", type(plan).__name__)
    if compensation is not None and calibration is None and compensation != "none":
        raise InvalidArgumentError(f"compensation '{compensation}' needs calibration= batches")
    with _gc_paused():
        before = module_widths(model)
        slim = apply_torch(model, plan, inplace=inplace)
        update_config(before, slim)
    if calibration is not None and compensation != "none":
        reference = model if not inplace else None
        if reference is None:
            raise InvalidArgumentError("compensation needs the original model: use inplace=False")
        compensate(reference, slim, plan, Calibration(calibration, max_batches), compensation or "lstsq")
    return slim


def compensate(original: nn.Module, pruned: nn.Module, plan: PruningPlan, calibration,
               mode: str = "lstsq", max_batches: int | None = None):
    """Correct ``pruned`` in place on calibration data; returns a report of the
    per-layer residuals before and after (see :mod:`graphprune.apply.compensate`)."""
    _check_model(original)
    _check_model(pruned)
    return _compensate(original, pruned, plan, Calibration(calibration, max_batches), mode)


def prune(model: nn.Module, example_inputs, ratio: float | None = None, importance=None, ignore=None,
          round_to: int = 1, strict: bool = False, inplace: bool = False, macs: float | None = None,
          params: float | None = None, calibration=None, compensation: str | None = None,
          max_batches: int | None = None, steps: int = 1, latency: float | None = None,
          **allocation) -> nn.Module:
    """``plan`` then ``apply`` in one call (``importance``, ``allocation``: see :func:`plan`).

    ``steps=K`` prunes iteratively: K rounds, each re-scoring the model the
    previous round produced (and compensating it, given calibration data),
    with per-round targets ``t ** (k / K)`` so that round K meets the budget
    ``t`` of the *original* model (for ``ratio``, the kept fraction of units).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise _bad("steps", "a positive integer", steps)
    kind, value = check_budget(ratio, macs, params, latency)
    if steps > 1 and kind == "latency":
        raise InvalidArgumentError("iterative pruning (steps > 1) takes ratio, macs or params budgets")
    if steps > 1 and inplace:
        raise InvalidArgumentError("iterative pruning (steps > 1) needs inplace=False")
    current = model
    dense = {"macs": lambda m: count_macs(m, example_inputs), "params": count_params}.get(kind)
    base = dense(model) if dense else None
    if steps == 1:
        p = plan(model, example_inputs, importance=importance, ignore=ignore, round_to=round_to, strict=strict,
                 calibration=calibration, max_batches=max_batches, **{kind: value}, **allocation)
        return apply(model, p, inplace=inplace, calibration=calibration, compensation=compensation,
                     max_batches=max_batches)
    shares = {k: check_ratio(allocation.pop(k, 0.0), k) for k in ("heads", "hidden")}
    for k in range(1, steps + 1):
        for key, share in shares.items():  # the same share of what remains, each round
            allocation[key] = 1 - (1 - share) ** (1 / steps)
        goal = (1 - value) ** (k / steps) if kind == "ratio" else value ** (k / steps)
        if kind == "ratio":
            prev = (1 - value) ** ((k - 1) / steps)
            budget = {"ratio": 1 - goal / prev}
        else:
            budget = {kind: min(1.0, goal * base / dense(current))}
        p = plan(current, example_inputs, importance=importance, ignore=_same_ignore(model, current, ignore),
                 round_to=round_to, strict=strict, calibration=calibration, max_batches=max_batches,
                 **budget, **allocation)
        current = apply(current, p, calibration=calibration,
                        compensation=compensation, max_batches=max_batches)
    return current


def _same_ignore(original, current, ignore):
    """``ignore`` re-expressed for a pruned copy: modules become their qualified names."""
    if ignore is None or current is original:
        return ignore
    names = {id(m): n for n, m in original.named_modules()}
    items = [ignore] if isinstance(ignore, (nn.Module, str)) else list(ignore)
    return [names.get(id(i), i) if isinstance(i, nn.Module) else i for i in items]


def verify(original: nn.Module, pruned: nn.Module, plan: PruningPlan, example_inputs,
           atol: float = 0.0, rtol: float = 1e-4) -> VerifyReport:
    """The oracle; raises :class:`~graphprune.errors.VerificationError`."""
    _check_model(original)
    _check_model(pruned)
    return verify_torch(original, pruned, plan, example_inputs, atol=atol, rtol=rtol)


def seed_everything(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
