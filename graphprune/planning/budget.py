"""Budgets: the uniform ratio whose plan meets a MACs or parameter target.

The cost of a plan is computed on the IR without applying it: every value
and parameter axis gets its new width (:class:`NewWidths`) and MACs and
parameters are counted with those shapes.  A bisection over the uniform
ratio finds the smallest ratio whose plan keeps at most ``target`` of the
dense cost; scores are computed once per group.

Invariant: the returned plan's cost is ``<= target * dense`` (by the
estimate), or :class:`PlanError` says how close the prunable groups get.
"""

from __future__ import annotations

from ..coupling.widths import NewWidths, removed_units
from ..errors import PlanError
from ..ir.cost import graph_macs, graph_params
from .planner import global_plan, uniform_plan

MEASURES = {"macs": graph_macs, "params": graph_params}


class _Cached:
    """Score each group once across the bisection."""

    def __init__(self, importance):
        self.importance = importance
        self.name = getattr(importance, "name", "custom")
        self.scores = {}

    def __call__(self, group, arrays):
        if group.id not in self.scores:
            self.scores[group.id] = self.importance(group, arrays)
        return self.scores[group.id]


def plan_cost(coupling, plan, measure) -> float:
    """Cost of ``plan`` by ``measure`` (a name in :data:`MEASURES` or a callable
    ``(graph, shape) -> cost``), counted on the IR without applying it."""
    widths = NewWidths(coupling.state, removed_units(coupling.state, plan))
    return _measure(measure)(coupling.graph, widths.shape)


def _measure(measure):
    return MEASURES[measure] if isinstance(measure, str) else measure


def budget_plan(coupling, planner, target: float, measure, steps: int = 14, max_ratio: float = 0.98,
                label: str | None = None):
    """The plan of the smallest fraction ``r`` for which ``planner(r)`` keeps
    ``<= target`` of ``measure`` (``planner`` is monotone in ``r``)."""
    label = label or measure
    dense = _measure(measure)(coupling.graph)
    if dense == 0:
        raise PlanError(f"the model has no {label} graphprune can count, so a {label} budget cannot apply")

    def attempt(r):
        p = planner(r)
        return p, plan_cost(coupling, p, measure) / dense

    best, frac = attempt(max_ratio)
    if frac > target:
        raise PlanError(f"{label} budget {target:.0%} cannot be met: the most graphprune may remove "
                        f"still keeps {frac:.1%}")
    lo, hi = 0.0, max_ratio
    for _ in range(steps):
        mid = (lo + hi) / 2
        p, f = attempt(mid)
        if f <= target:
            hi, best, frac = mid, p, f
        else:
            lo = mid
    best.meta.update({"budget": {label: target}, "ratio": round(hi, 4), f"{label}_kept_estimate": round(frac, 4)})
    return best


ALLOCATIONS = ("local", "global")


def make_plan(coupling, arrays, importance, kind: str, value: float, round_to: int, meta,
              allocation: str = "local", normalizer: str = "mean", max_ratio: float = 0.9, measure=None,
              heads: float = 0.0, hidden: float = 0.0):
    """One plan for a budget (checked by :func:`graphprune.checks.check_budget`).

    ``local``: the same ratio in every channel group.  ``global``: one ranking
    of all channel units, scores normalised per group by ``normalizer``, at
    most ``max_ratio`` of any group removed.  Head groups lose ``heads`` of
    their heads and hidden-width groups ``hidden`` of their width whatever
    the budget; channels make up the rest of a MACs,
    params or latency budget.  ``measure`` overrides the cost function of
    the budget kind (e.g. a measured-latency model).
    """
    scorer = _Cached(importance)
    meta = dict(meta or {}, allocation=allocation, heads=heads, hidden=hidden)
    kinds = {"head": heads, "hidden": hidden}
    if allocation == "global":
        meta.update(normalizer=normalizer, max_ratio=max_ratio)

        def planner(r):
            return global_plan(coupling.groups, arrays, scorer, r, round_to, meta, normalizer, max_ratio, kinds)
    else:
        def planner(r):
            return uniform_plan(coupling.groups, arrays, scorer, {"channel": r, **kinds}, round_to, meta)
    if kind == "ratio":
        return planner(value)
    return budget_plan(coupling, planner, value, measure or kind, label=kind)
