"""The oracle, independent of the framework that runs the model.

Reference = a copy of the original in which every removed position of every
planned ``out``-role member (producing rows, biases, norm affine, layer
scales) and every ``in``-role member (consumer columns) is zero.  Nothing
downstream can read a removed channel, so reference and pruned model must
agree to float tolerance.

Groups marked lossy (LayerNorm statistics, width-dependent attention scale)
cannot match exactly.  They are never passed silently: the exact groups are
checked on their own (the rewrite of the exact sub-plan against its zeroed
reference), the given model must compute what the rewrite of the full plan
computes, and the deviation the lossy groups add is measured and reported.

A backend supplies three operations: ``apply(plan)`` (rewrite the
original), ``zeroed(plan)`` (the reference) and ``run(model)`` (outputs as
float numpy arrays on the fixed inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import VerificationError
from ..planning.plan import PruningPlan


class Backend(Protocol):
    def apply(self, plan: PruningPlan): ...

    def zeroed(self, plan: PruningPlan): ...

    def run(self, model) -> list[np.ndarray]: ...


@dataclass
class VerifyReport:
    max_abs_diff: float
    scale: float
    tolerance: float
    exact_groups: int
    lossy_groups: list[int] = field(default_factory=list)
    lossy_max_abs_diff: float | None = None

    @property
    def exact(self) -> bool:
        return not self.lossy_groups

    def __str__(self) -> str:
        s = (f"oracle: {self.exact_groups} exact groups, max |diff| {self.max_abs_diff:.3g} "
             f"(output scale {self.scale:.3g}, tolerance {self.tolerance:.3g})")
        if self.lossy_groups:
            s += (f"; {len(self.lossy_groups)} lossy groups (LayerNorm/attention statistics) "
                  f"change outputs by up to {self.lossy_max_abs_diff:.3g}")
        return s


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max((float(np.abs(x - y).max()) if x.size else 0.0 for x, y in zip(a, b)), default=0.0)


def scale_of(outs: list[np.ndarray]) -> float:
    return max((float(np.abs(t).max()) for t in outs if t.size), default=0.0)


def run_checked(backend: Backend, model, what: str) -> list[np.ndarray]:
    """Run ``model``; a model that does not run fails verification (typed)."""
    try:
        return backend.run(model)
    except Exception as err:
        text = str(err).strip().splitlines()
        raise VerificationError(f"{what} fails to run: {type(err).__name__}: "
                                f"{text[0][:200] if text else ''}") from err


def check(backend: Backend, pruned, plan: PruningPlan, atol: float = 0.0, rtol: float = 1e-4) -> VerifyReport:
    """Raise :class:`VerificationError` naming the worst group if the check fails."""
    exact_plan = plan.subset(lambda g: not g.lossy)
    lossy = plan.lossy_groups
    candidate = pruned if not lossy else backend.apply(exact_plan)
    ref_out = backend.run(backend.zeroed(exact_plan))
    scale = scale_of(ref_out)
    tol = atol + rtol * scale
    diff = max_diff(ref_out, run_checked(backend, candidate, "pruned model"))
    if not diff <= tol:
        raise VerificationError(
            f"pruned model differs from the oracle by {diff:.3g} (tolerance {tol:.3g}); "
            f"worst group {worst_group(backend, exact_plan)}")
    report = VerifyReport(diff, scale, tol, len(exact_plan.groups), lossy)
    if lossy:
        got = run_checked(backend, pruned, "pruned model")
        expected = backend.run(backend.apply(plan))
        mismatch = max_diff(expected, got)
        if not mismatch <= atol + rtol * scale_of(expected):
            raise VerificationError(
                f"pruned model differs by {mismatch:.3g} from graphprune's rewrite of the plan "
                f"(lossy groups {lossy[:5]})")
        report.lossy_max_abs_diff = max_diff(backend.run(backend.zeroed(plan)), got)
    return report


def worst_group(backend: Backend, plan: PruningPlan, limit: int = 200) -> str:
    """Check groups one at a time and name the one with the largest error."""
    worst, worst_diff = "unknown", -1.0
    for g in plan.groups[:limit]:
        single = plan.subset(lambda h, gid=g.id: h.id == gid)
        try:
            d = max_diff(backend.run(backend.zeroed(single)), backend.run(backend.apply(single)))
        except Exception as err:  # a group whose rewrite does not even run
            d, note = float("inf"), f" ({type(err).__name__}: {str(err)[:120]})"
        else:
            note = ""
        if d > worst_diff:
            worst_diff = d
            worst = f"{g.id} (producer '{g.members[0].name}', diff {d:.3g}){note}"
    return worst
