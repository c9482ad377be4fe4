"""Reconstruction criterion: the output error a unit's removal leaves at the
layers that read it, after those layers are refitted by least squares.

For a consumer (an ``in``-role Linear or Conv2d weight ``W``, flattened to
``[out, D]``) with input Gram matrix ``G = X^T X`` on calibration data and
``H = G + lam I`` (``lam = ridge * mean(diag G)``, by default the ridge
:data:`RIDGE` of :mod:`graphprune.apply.compensate`), removing the input columns ``S`` and
refitting the kept ones optimally costs (optimal brain surgeon)

    err(S) = tr(W_S (Hinv_SS)^-1 W_S^T)            Hinv = H^-1

A head's columns are all ``head_dim`` columns it feeds into the output
projection; a conv channel's are its ``kh * kw`` patch columns.  Units are
removed greedily, a few at a time, each step taking the units of lowest
``err`` given the ones already gone (``W`` and ``Hinv`` are updated the OBS
way after every step), so correlated units are not removed together by
mistake.  A unit's score is its ``err`` at the step it was removed,
made non-decreasing along the removal order: the ``k`` lowest scores are
exactly the first ``k`` greedy removals.  Prunable units are removed before
the others.  Scores are absolute squared output errors, summed over the
consumers of a group (each is compensated on its own); where a consumer
feeds a LayerNorm/RMSNorm, ``X``'s rows are weighted by one over that norm's
squared scale (``graphprune.calibration.gram_statistics``), so errors are
in the units the norm passes on.  Being one unit everywhere, they are
ranked globally by default (``gp.plan``).  Groups without a
consumer statistic fall back to L2.  A unit whose columns are zero in ``W``
or never active in ``X`` scores 0.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidArgumentError
from .importance import Importance, register_importance

STEPS = 128  # greedy rounds over the width of a consumer (at least one unit each)
RIDGE = 0.1  # relative ridge of the least-squares refit, shared with graphprune.apply.compensate


@register_importance("reconstruction")
class ReconstructionImportance(Importance):
    """Least-squares reconstruction error at the consumers (see module docstring);
    arrays: ``X^T X`` of each consumer's input under its weight's name."""

    statistic = "gram"
    fallback = True
    comparable = True  # squared output errors (norm-scaled where a norm follows): one unit in every group

    def __init__(self, reduction: str = "sum", ridge: float = RIDGE):
        super().__init__(reduction)
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
            raise InvalidArgumentError(f"ridge must be a positive number, got {ridge!r}")
        self.ridge = float(ridge)

    def members(self, group):
        return [m for m in group.members if not m.is_buffer and m.indices and m.role == "in"
                and m.op in ("conv", "linear") and m.slot == 1]

    def member_scores(self, group, arrays) -> np.ndarray:
        """``[consumers, units]`` greedy errors, NaN where a consumer lacks the unit."""
        weights = getattr(arrays, "weights", arrays)
        members = self.scored_members(group, arrays)
        index = {u: i for i, u in enumerate(group.units)}
        table = np.full((len(members), len(group.units)), np.nan)
        for row, m in enumerate(members):
            w = np.asarray(weights[m.param], dtype=np.float64)
            w = np.moveaxis(w, m.axis, 1)
            kk = int(np.prod(w.shape[2:], dtype=np.int64))
            units = list(dict.fromkeys(m.units))
            cols = {u: [] for u in units}
            for p, u in zip(m.indices, m.units):
                cols[u].extend(range(p * kk, (p + 1) * kk))
            prunable = [group.prunable[index[u]] for u in units]
            errs = greedy_errors(w.reshape(w.shape[0], -1), np.asarray(arrays[m.param], dtype=np.float64),
                                 [np.asarray(cols[u]) for u in units], prunable, self.ridge)
            table[row, [index[u] for u in units]] = errs
        return table


def unit_errors(w: np.ndarray, hinv: np.ndarray, cols: list[np.ndarray]) -> np.ndarray:
    """``tr(W_S (Hinv_SS)^-1 W_S^T)`` for each column set ``S`` in ``cols``
    (batched over sets of equal size)."""
    out = np.empty(len(cols))
    by_size: dict[int, list[int]] = {}
    for i, c in enumerate(cols):
        by_size.setdefault(len(c), []).append(i)
    for k, idx in by_size.items():
        c = np.stack([cols[i] for i in idx])                      # [U, k]
        a = hinv[c[:, :, None], c[:, None, :]]                    # [U, k, k]
        ws = np.transpose(w[:, c], (1, 2, 0))                     # [U, k, out]
        if k == 1:
            out[idx] = np.square(ws[:, 0, :]).sum(1) / np.maximum(a[:, 0, 0], 1e-300)
        else:
            out[idx] = np.sum(ws * np.linalg.solve(a, ws), axis=(1, 2))
    return out


def greedy_errors(w: np.ndarray, gram: np.ndarray, cols: list[np.ndarray], prunable, ridge: float) -> np.ndarray:
    """Greedy OBS removal order of the column sets ``cols`` of ``w`` ``[out, D]``
    given the input Gram matrix ``gram`` ``[D, D]``; returns each set's error
    at its removal step, non-decreasing along the order (module docstring).
    ``w`` and ``Hinv`` shrink to the remaining columns after every step."""
    gram = 0.5 * (gram + gram.T)
    lam = ridge * float(np.mean(np.diag(gram))) + 1e-12
    hinv = np.linalg.inv(gram + lam * np.eye(gram.shape[0]))
    cols = [np.asarray(c) for c in cols]
    alive = list(range(len(cols)))
    scores = np.zeros(len(cols))
    per_step = max(1, math.ceil(len(cols) / STEPS))
    level = 0.0
    while alive:
        errs = unit_errors(w, hinv, [cols[i] for i in alive])
        rank = sorted(range(len(alive)), key=lambda j: (not prunable[alive[j]], errs[j]))[:per_step]
        for j in rank:
            level = max(level, float(errs[j]))
            scores[alive[j]] = level
        taken = {alive[j] for j in rank}
        s = np.concatenate([cols[i] for i in taken])
        keep = np.ones(hinv.shape[0], dtype=bool)
        keep[s] = False
        step = np.linalg.solve(hinv[np.ix_(s, s)], hinv[np.ix_(s, keep)])  # (Hinv_SS)^-1 Hinv_SK
        w = w[:, keep] - w[:, s] @ step
        hinv = hinv[np.ix_(keep, keep)] - hinv[np.ix_(keep, s)] @ step
        where = np.cumsum(keep) - 1
        alive = [i for i in alive if i not in taken]
        for i in alive:
            cols[i] = where[cols[i]]
    return scores
