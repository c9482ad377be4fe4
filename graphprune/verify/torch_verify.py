"""The oracle for PyTorch models (see :mod:`graphprune.verify.oracle`)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..apply.torch_apply import apply_torch
from ..capture.torch_fx import as_args
from ..errors import InvalidArgumentError
from ..planning.plan import PruningPlan
from .oracle import VerifyReport, check

__all__ = ["VerifyReport", "verify_torch", "zeroed_reference", "run"]


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


def run(model: torch.nn.Module, inputs) -> list[np.ndarray]:
    """Run in eval mode under no_grad; outputs flattened to float numpy arrays."""
    args, kwargs = as_args(inputs)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        model.train(was)
    flat = torch.utils._pytree.tree_leaves(out)
    return [t.detach().float().cpu().numpy() for t in flat if isinstance(t, torch.Tensor)]


class TorchBackend:
    """Oracle operations on a PyTorch ``original`` with fixed ``inputs``."""

    def __init__(self, original: torch.nn.Module, inputs):
        self.original = original
        self.inputs = inputs

    def apply(self, plan):
        return apply_torch(self.original, plan)

    def zeroed(self, plan):
        return zeroed_reference(self.original, plan)

    def run(self, model):
        return run(model, self.inputs)


def verify_torch(original, pruned, plan: PruningPlan, inputs, atol=0.0, rtol=1e-4) -> VerifyReport:
    """Raise :class:`VerificationError` naming the worst group if the check fails."""
    for what, model in (("model", original), ("pruned model", pruned)):
        meta = next((n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
        if meta is not None:
            raise InvalidArgumentError(f"verify compares outputs, but the {what}'s '{meta}' is on the meta device "
                                       f"(no data): load the weights first")
    return check(TorchBackend(original, inputs), pruned, plan, atol=atol, rtol=rtol)
