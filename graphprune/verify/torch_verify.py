"""The oracle: prove a pruned model computes what the plan says.

Reference = a copy of the original in which every removed position of every
planned member (``out`` rows, biases, norm affine, layer scales *and* ``in``
columns of consumers) is set to zero.  Nothing downstream can read a removed
channel, so reference and pruned model must agree to float tolerance.

Groups marked lossy (LayerNorm statistics, width-dependent attention scale)
cannot match exactly.  They are never passed silently: the exact groups are
checked on their own (``apply`` of the exact sub-plan against its zeroed
reference) and the deviation the lossy groups add is measured and reported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..apply.torch_apply import apply_torch
from ..capture.torch_fx import as_args
from ..errors import VerificationError
from ..planning.plan import PruningPlan


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


def zeroed_reference(original: torch.nn.Module, plan: PruningPlan) -> torch.nn.Module:
    """A copy of ``original`` with every removed member slice set to zero."""
    ref = copy.deepcopy(original)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for g in plan.groups:
            for m in g.members:
                if m.is_buffer or m.name not in params or not m.removed:
                    continue
                idx = torch.tensor(m.removed, dtype=torch.long)
                params[m.name].index_fill_(m.axis, idx, 0.0)
    return ref


def run(model: torch.nn.Module, inputs) -> list[torch.Tensor]:
    """Run in eval mode under no_grad and flatten the outputs to tensors."""
    args, kwargs = as_args(inputs)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        model.train(was)
    flat = torch.utils._pytree.tree_leaves(out)
    return [t.detach().float() for t in flat if isinstance(t, torch.Tensor)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max((float((x - y).abs().max()) for x, y in zip(a, b)), default=0.0)


def _run_checked(model, inputs, what: str) -> list[torch.Tensor]:
    """Run ``model``; a model that does not run fails verification (typed)."""
    try:
        return run(model, inputs)
    except Exception as err:
        raise VerificationError(f"{what} fails to run: {type(err).__name__}: "
                                f"{str(err).splitlines()[0][:200] if str(err) else ''}") from err


def verify_torch(original, pruned, plan: PruningPlan, inputs, atol=0.0, rtol=1e-4) -> VerifyReport:
    """Raise :class:`VerificationError` naming the worst group if the check fails.

    Without lossy groups ``pruned`` is compared with the zeroed original.
    With lossy groups, the exact sub-plan is proved on its own, and
    ``pruned`` must then compute what graphprune's rewrite of the full plan
    computes (same outputs); its deviation from the zeroed original is the
    reported lossy error.
    """
    exact_plan = plan.subset(lambda g: not g.lossy)
    lossy = plan.lossy_groups
    candidate = pruned if not lossy else apply_torch(original, exact_plan)
    ref_out = run(zeroed_reference(original, exact_plan), inputs)
    scale = max((float(t.abs().max()) for t in ref_out), default=0.0)
    tol = atol + rtol * scale
    diff = max_diff(ref_out, _run_checked(candidate, inputs, "pruned model"))
    if not diff <= tol:
        worst = _worst_group(original, exact_plan, inputs)
        raise VerificationError(
            f"pruned model differs from the oracle by {diff:.3g} (tolerance {tol:.3g}); "
            f"worst group {worst}")
    report = VerifyReport(diff, scale, tol, len(exact_plan.groups), lossy)
    if lossy:
        got = _run_checked(pruned, inputs, "pruned model")
        expected = run(apply_torch(original, plan), inputs)
        mismatch = max_diff(expected, got)
        exp_scale = max((float(t.abs().max()) for t in expected), default=0.0)
        if not mismatch <= atol + rtol * exp_scale:
            raise VerificationError(
                f"pruned model differs by {mismatch:.3g} from graphprune's rewrite of the plan "
                f"(lossy groups {lossy[:5]})")
        report.lossy_max_abs_diff = max_diff(run(zeroed_reference(original, plan), inputs), got)
    return report


def _worst_group(original, plan: PruningPlan, inputs, limit: int = 200) -> str:
    """Check groups one at a time and name the one with the largest error."""
    worst, worst_diff = "unknown", -1.0
    for g in plan.groups[:limit]:
        single = plan.subset(lambda h, gid=g.id: h.id == gid)
        try:
            d = max_diff(run(zeroed_reference(original, single), inputs),
                         run(apply_torch(original, single), inputs))
        except Exception as err:  # a group whose rewrite does not even run
            d, note = float("inf"), f" ({type(err).__name__}: {str(err)[:120]})"
        else:
            note = ""
        if d > worst_diff:
            worst_diff = d
            worst = f"{g.id} (producer '{g.members[0].name}', diff {d:.3g}){note}"
    return worst
