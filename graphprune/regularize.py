"""Sparse-training helpers over graphprune's groups, for users who do train.

    reg = gp.GroupLasso(model, x, lam=1e-4, ignore=[model.fc])
    loss = criterion(model(batch), labels) + reg()

``GroupLasso`` is ``lam * sum over prunable units of the L2 norm of all their
slices taken together`` (every member of the unit's group: producing rows,
norm affine, consumer columns), so whole units shrink towards zero and later
rank last under any magnitude criterion.  ``BNL1`` is network slimming's
``lam * sum |gamma|`` over BatchNorm scales.  Both are differentiable and read
the model's current parameters at each call.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class GroupLasso:
    """Group-lasso penalty over the model's coupled groups (built on first call)."""

    def __init__(self, model: nn.Module, example_inputs, lam: float = 1e-4, ignore=None, eps: float = 1e-12):
        self.model = model
        self.example_inputs = example_inputs
        self.lam = lam
        self.ignore = ignore
        self.eps = eps
        self._terms = None

    def _build(self):
        from .api import analyze

        coupling = analyze(self.model, self.example_inputs, ignore=self.ignore)
        terms = []
        for g in coupling.groups:
            if not g.n_prunable:
                continue
            index = {u: i for i, u in enumerate(g.units)}
            members = [(m.param, m.axis, torch.tensor(m.indices), torch.tensor([index[u] for u in m.units]))
                       for m in g.members if not m.is_buffer and m.indices]
            terms.append((len(g.units), members))
        return terms

    def __call__(self) -> torch.Tensor:
        if self._terms is None:
            self._terms = self._build()
        params = dict(self.model.named_parameters())
        total = torch.zeros((), device=next(self.model.parameters()).device)
        for width, members in self._terms:
            acc = torch.zeros(width, device=total.device)
            for name, axis, pos, units in members:
                w = params[name]
                dims = [d for d in range(w.dim()) if d != axis]
                sq = w.pow(2).sum(dims) if dims else w.pow(2)
                acc = acc.index_add(0, units.to(total.device), sq[pos.to(total.device)])
            total = total + (acc + self.eps).sqrt().sum()
        return self.lam * total


class BNL1:
    """``lam * sum |gamma|`` over the model's BatchNorm scales."""

    def __init__(self, model: nn.Module, lam: float = 1e-4):
        self.model = model
        self.lam = lam

    def __call__(self) -> torch.Tensor:
        terms = [m.weight.abs().sum() for m in self.model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
        return self.lam * torch.stack(terms).sum() if terms else torch.zeros(())
