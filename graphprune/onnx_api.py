"""The public ONNX API: the same pipeline as for PyTorch, on ``ModelProto``s.

``plan_onnx`` / ``apply_onnx`` / ``prune_onnx`` / ``verify_onnx`` accept a
``ModelProto`` or a path and never modify the caller's model or file.
``inputs`` (optional everywhere) is a dict ``{input name: array}``, a single
array for a one-input model, or a list in graph-input order; without it,
seeded random inputs with symbolic dimensions set to 1 are used.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from .apply.onnx_apply import apply_onnx as _apply
from .atomic import atomic_path
from .capture.onnx_capture import capture_onnx
from .capture.onnx_load import graph_inputs, input_shapes, load_model, random_inputs
from .checks import check_allocation, check_budget, check_round_to
from .coupling.groups import Coupling, couple
from .errors import InvalidArgumentError
from .ir.cost import graph_macs
from .planning.budget import make_plan
from .planning.plan import PruningPlan
from .scoring.importance import get_importance
from .verify.onnx_verify import median_seconds, session
from .verify.onnx_verify import verify_onnx as _verify
from .verify.oracle import VerifyReport


def feeds(model: onnx.ModelProto, inputs=None) -> dict[str, np.ndarray]:
    """Normalise ``inputs`` to ``{name: array}`` (random if ``None``)."""
    names = [v.name for v in graph_inputs(model)]
    if inputs is None:
        return random_inputs(model, input_shapes(model))
    if isinstance(inputs, dict):
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise InvalidArgumentError(f"inputs name {unknown}, but the model's inputs are {names}")
        return {k: np.asarray(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        if len(inputs) != len(names):
            raise InvalidArgumentError(f"the model has {len(names)} inputs {names}, got {len(inputs)} arrays")
        return {n: np.asarray(v) for n, v in zip(names, inputs)}
    if len(names) != 1:
        raise InvalidArgumentError(f"the model has {len(names)} inputs {names}: pass a dict")
    return {names[0]: np.asarray(inputs)}


def resolve_ignore_onnx(model: onnx.ModelProto, ignore) -> set[str]:
    """Initializer names covered by ``ignore`` (initializer or node names)."""
    if ignore is None:
        return set()
    if isinstance(ignore, str):
        ignore = [ignore]
    inits = {t.name for t in model.graph.initializer}
    consts = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    nodes = {n.name: n for n in model.graph.node if n.name}
    out: set[str] = set()
    for item in ignore:
        if not isinstance(item, str):
            raise InvalidArgumentError(f"ignore must hold initializer or node names, got {item!r}")
        if item in inits or item in consts:
            out.add(item)
        elif item in nodes:
            out.update(i for i in nodes[item].input if i in inits or i in consts)
        else:
            raise InvalidArgumentError(f"ignore names '{item}', which is neither an initializer nor a node")
    return out


def analyze_onnx(model, inputs=None, ignore: Iterable | None = None, strict: bool = False) -> Coupling:
    """Capture an ONNX model and return its coupled groups."""
    m = load_model(model)
    fixed = resolve_ignore_onnx(m, ignore)
    cap = capture_onnx(m, feeds(m, inputs))
    result = couple(cap.graph, strict=strict, fixed_params=fixed)
    result.method = "onnx"
    return result


class _LazyInits(dict):
    """Float initializers as numpy arrays, converted on first access."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        self._protos = {t.name: t for t in model.graph.initializer}

    def __missing__(self, key):
        arr = numpy_helper.to_array(self._protos[key]).astype(np.float32)
        self[key] = arr
        return arr


def plan_onnx(model, ratio: float | None = None, importance="l2", ignore=None, round_to: int = 1,
              strict: bool = False, inputs=None, macs: float | None = None,
              params: float | None = None, allocation: str = "local", normalizer: str = "mean",
              max_ratio: float = 0.9) -> PruningPlan:
    """Decide what to remove from an ONNX model (members named by initializer).

    Budgets as in :func:`graphprune.plan`: ``ratio`` (default 0.5), or
    ``macs`` / ``params`` as fractions of the dense model to keep;
    ``allocation`` / ``normalizer`` / ``max_ratio`` as for PyTorch.
    """
    kind, value = check_budget(ratio, macs, params)
    alloc = check_allocation(allocation, normalizer, max_ratio)
    round_to = check_round_to(round_to)
    scorer = get_importance(importance)
    if scorer.statistic != "weight":
        raise InvalidArgumentError(f"importance '{scorer.name}' needs gradients: it works on PyTorch models only")
    m = load_model(model)
    fixed = resolve_ignore_onnx(m, ignore)
    cap = capture_onnx(m, feeds(m, inputs))
    coupling = couple(cap.graph, strict=strict, fixed_params=fixed)
    meta = {"model": m.graph.name or "onnx", "ratio": value if kind == "ratio" else None,
            "importance": getattr(scorer, "name", "custom"), "round_to": round_to, "capture": "onnx",
            "barriers": coupling.barriers}
    return make_plan(coupling, _LazyInits(cap.model), scorer, kind, value, round_to, meta, **alloc)


def _check_plan(plan) -> None:
    if not isinstance(plan, PruningPlan):
        raise InvalidArgumentError(f"plan must be a PruningPlan, got {type(plan).__name__}")


def apply_onnx(model, plan: PruningPlan, inputs=None) -> onnx.ModelProto:
    """Return a smaller ``ModelProto``; it passes the full ONNX checker."""
    _check_plan(plan)
    m = load_model(model)
    return _apply(m, plan, feeds(m, inputs))


def prune_onnx(model, ratio: float | None = None, importance="l2", ignore=None, round_to: int = 1,
               strict: bool = False, inputs=None, macs: float | None = None,
               params: float | None = None, **allocation) -> onnx.ModelProto:
    """``plan_onnx`` then ``apply_onnx`` (``allocation``: see :func:`plan_onnx`)."""
    m = load_model(model)
    p = plan_onnx(m, ratio=ratio, importance=importance, ignore=ignore, round_to=round_to,
                  strict=strict, inputs=inputs, macs=macs, params=params, **allocation)
    return apply_onnx(m, p, inputs)


def verify_onnx(original, pruned, plan: PruningPlan, inputs=None, atol: float = 0.0,
                rtol: float = 1e-4) -> VerifyReport:
    """The oracle with onnxruntime; raises :class:`VerificationError`."""
    _check_plan(plan)
    m = load_model(original)
    p = load_model(pruned)
    return _verify(m, p, plan, feeds(m, inputs), atol=atol, rtol=rtol)


def count_params_onnx(model) -> int:
    """Elements of all float initializers (and float ``Constant`` values)."""
    m = load_model(model)
    total = 0
    for t in m.graph.initializer:
        if np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type), np.floating):
            total += int(np.prod(t.dims))
    return total


def count_macs_onnx(model, inputs=None) -> int:
    """MACs of one forward pass, from the captured IR's shapes."""
    m = load_model(model)
    return graph_macs(capture_onnx(m, feeds(m, inputs)).graph)


def latency_onnx(model, inputs=None, repeats: int = 20, warmup: int = 3, threads: int = 1) -> float:
    """Median wall time (seconds) of one onnxruntime CPU run."""
    m = load_model(model)
    return median_seconds(session(m, threads=threads), feeds(m, inputs), repeats, warmup)


def save_onnx(model: onnx.ModelProto, path: str) -> None:
    """Write atomically: a failure leaves nothing at ``path``."""
    with atomic_path(path) as tmp:
        onnx.save(model, tmp)
