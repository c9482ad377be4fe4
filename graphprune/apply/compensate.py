"""Retraining-free compensation of a pruned PyTorch model on calibration data.

For every layer that *reads* a pruned group (an ``in``-role Conv2d/Linear
weight), in the order the original model runs them, the layer's new
weights are corrected so that, on the calibration batches, it reproduces
what the original layer computed from the original inputs:

    T = W * X_orig - W_kept * X_pruned          (pre-bias outputs)
    lstsq:  W_kept += D,  D = argmin ||T - D * X_pruned||^2 + lam ||D||^2
    bias:   b += mean(T)

(``lam = ridge * mean(diag(X_pruned^T X_pruned))``, ``ridge`` 0.1 by
default: on MiniLM, 25% of heads and MLP channels, 600 sentences, it
beats 1e-3, 1e-2, 0.3 and 1, and with all 1158 sentences and norm targets
0.03 and 0.25; the reconstruction criterion uses the same.)

A Linear whose output reaches a LayerNorm/RMSNorm input only through
additions (``LayerNorm(dense(h) + residual)``; found on the captured graph,
``plan.meta["norm_inputs"]``) is fitted to that norm's input instead:
``T = Z_orig - Z_pruned``, so the layer also absorbs the residual's drift
from earlier layers, and each token's row is weighted by one over the
square of the norm's scale on it (the error the norm passes on).  Adding
``D * X_pruned`` changes ``Z_pruned`` by exactly that, so the same algebra holds.

``bn``: every BatchNorm's running statistics move by the shift the pruning
causes on calibration data (mean += mean_pruned - mean_original, var *=
var_pruned / var_original, per kept channel), again exact-preserving.

With a tokenizer's ``attention_mask`` in the batches, only real tokens are
fitted.  ``X_pruned`` is taken from the pruned model *after* the earlier layers were
corrected, so errors do not accumulate.  The correction is fitted to the
residual, never to the weights themselves, hence it is exact-preserving: a
plan that removes only dead channels gives ``T == 0`` and changes nothing.
Grouped convs are left alone (reported).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..calibration import input_rows, norm_modules, norm_scale, real_tokens
from ..capture.torch_fx import as_args
from ..errors import InvalidArgumentError
from ..scoring.reconstruction import RIDGE

MODES = ("lstsq", "bias", "bn", "none")


@dataclass
class CompensationReport:
    """Per corrected layer: squared residual on calibration data before/after."""

    mode: str
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _consumers(plan) -> set[str]:
    return {m.name.rpartition(".")[0] for g in plan.groups for m in g.members
            if m.role == "in" and m.name.endswith("weight") and m.removed}


def _order(model, batches, names) -> list[str]:
    """``names`` in the order the model calls them."""
    seen: list[str] = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.append(n))
             for n in names]
    try:
        _forward(model, batches[0])
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(seen))


def _forward(model, batch):
    args, kwargs = as_args(batch)
    with torch.no_grad():
        return model(*args, **kwargs)


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def _capture_inputs(model, names, batch) -> list:
    """The first inputs of submodules ``names`` on ``batch``; the forward
    stops once all were seen (each the first time it runs)."""
    box: dict = {}

    def grab(name):
        def fn(mod, args):
            box.setdefault(name, args[0])
            if len(box) == len(set(names)):
                raise _Stop
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(grab(n)) for n in dict.fromkeys(names)]
    try:
        _forward(model, batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return [box[n] for n in names]


def _flat_weight(w):
    return w.reshape(w.shape[0], -1)


def compensate(original: nn.Module, pruned: nn.Module, plan, calibration, mode: str = "lstsq",
               ridge: float = RIDGE) -> CompensationReport:
    """Correct ``pruned`` in place (see module docstring); ``original`` is read only."""
    if mode not in MODES:
        raise InvalidArgumentError(f"compensation must be one of {MODES}, got {mode!r}")
    report = CompensationReport(mode)
    if mode == "none":
        return report
    batches = list(calibration)
    was = (original.training, pruned.training)
    original.eval()
    pruned.eval()
    if mode == "bn":
        try:
            _recalibrate_bn(original, pruned, plan, batches, report)
        finally:
            original.train(was[0])
            pruned.train(was[1])
        return report
    consumers = _consumers(plan)
    norms = norm_targets(original, plan, consumers)
    try:
        for name in _order(original, batches, consumers):
            o_mod, p_mod = original.get_submodule(name), pruned.get_submodule(name)
            if not isinstance(o_mod, (nn.Linear, nn.Conv2d)) or getattr(o_mod, "groups", 1) != 1:
                report.skipped[name] = f"{type(o_mod).__name__} (groups={getattr(o_mod, 'groups', 1)})"
                continue
            removed = plan.removals().get((f"{name}.weight", 0), set())
            kept_out = [i for i in range(o_mod.weight.shape[0]) if i not in removed]
            report.layers[name] = _fit(original, pruned, o_mod, p_mod, name, batches, mode, ridge, kept_out,
                                       norms.get(name))
    finally:
        original.train(was[0])
        pruned.train(was[1])
    return report


def _fit(original, pruned, o_mod, p_mod, name, batches, mode, ridge, kept_out, norm) -> tuple[float, float]:
    """Fit the correction of one layer; returns the squared residual before/after."""
    st = _residual_moments(original, pruned, o_mod, p_mod, name, batches, kept_out, norm)
    before, rows = st["before"], st["rows"]
    with torch.no_grad():
        if mode == "bias":
            shift = st["rsum"] / (rows if rows > 0 else 1.0)
            if p_mod.bias is None:
                return before, before
            p_mod.bias += shift.to(p_mod.bias.dtype)
            after = before - rows * float((shift ** 2).sum())
            return before, after
        gram, cross = st["gram"], st["cross"]
        lam = ridge * float(torch.diagonal(gram).mean()) + 1e-12
        delta = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), cross)
        after = before - float((2 * cross * delta).sum()) + float((delta * (gram @ delta)).sum())
        p_mod.weight += delta.T.reshape(p_mod.weight.shape).to(p_mod.weight.dtype)
    return before, max(after, 0.0)


def _residual_moments(original, pruned, o_mod, p_mod, name, batches, kept_out, norm=None) -> dict:
    """Weighted sums over real calibration rows of ``A^T A``, ``A^T T``,
    ``T`` and ``|T|^2`` (``rows``: the sum of the weights) for ``A`` the
    pruned layer's inputs and ``T`` what it misses: the pre-bias output
    (module docstring, weight 1), or with ``norm`` (the LayerNorm/RMSNorm
    that reads the layer's output plus the residual, :func:`norm_targets`)
    the difference of that norm's inputs, each row weighted by one over the
    square of the original row's norm scale (the error the norm passes on)."""
    w_o = _flat_weight(o_mod.weight.detach()).double()[kept_out]
    w_p = _flat_weight(p_mod.weight.detach()).double()
    d, o = w_p.shape[1], w_p.shape[0]
    st = {"gram": torch.zeros(d, d, dtype=torch.float64), "cross": torch.zeros(d, o, dtype=torch.float64),
          "rsum": torch.zeros(o, dtype=torch.float64),
          "before": 0.0, "rows": 0.0}
    names = [name] if norm is None else [name, norm]
    for batch in batches:
        (x_o, *z_o), (x_p, *z_p) = _capture_inputs(original, names, batch), _capture_inputs(pruned, names, batch)
        a_p = input_rows(p_mod, x_p).double()
        if norm is None:
            t = input_rows(o_mod, x_o).double() @ w_o.T - a_p @ w_p.T
            w = torch.ones(t.shape[0], 1, dtype=torch.float64)
        else:
            if z_o[0].shape[:-1] != x_o.shape[:-1]:  # a broadcasting residual: fit the layer's output
                return _residual_moments(original, pruned, o_mod, p_mod, name, batches, kept_out)
            zo = z_o[0].reshape(-1, z_o[0].shape[-1]).double()
            t = zo[:, kept_out] - z_p[0].reshape(-1, o).double()
            w = 1.0 / norm_scale(original.get_submodule(norm), zo)
        keep = real_tokens(batch, x_o, o_mod)
        if keep is not None:
            a_p, t, w = a_p[keep], t[keep], w[keep]
        st["before"] += float((w * t ** 2).sum())
        st["gram"] += (w * a_p).T @ a_p
        st["cross"] += (w * a_p).T @ t
        st["rsum"] += (w * t).sum(0)
        st["rows"] += float(w.sum())
    return st


def norm_targets(model, plan, consumers) -> dict[str, str]:
    """``{consumer: norm module}`` (:func:`graphprune.calibration.norm_modules`)
    from the plan's record of which layers feed a norm (``plan.meta["norm_inputs"]``)."""
    return norm_modules(model, plan.meta.get("norm_inputs", {}), consumers)


def _channel_moments(model, name, batches):
    """Per-channel mean and variance of BatchNorm ``name``'s input on the batches."""
    total, sq, n = 0, 0, 0
    for batch in batches:
        x = _capture_inputs(model, [name], batch)[0].double()
        dims = [d for d in range(x.dim()) if d != 1]
        total = total + x.sum(dims)
        sq = sq + (x * x).sum(dims)
        n += x.numel() // x.shape[1]
    mean = total / n
    return mean, sq / n - mean * mean


def _recalibrate_bn(original, pruned, plan, batches, report) -> None:
    removals = plan.removals()
    names = [n for n, m in original.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in _order(original, batches, names):
        p_mod = pruned.get_submodule(name)
        if p_mod.running_mean is None:
            report.skipped[name] = "BatchNorm without running statistics"
            continue
        removed = removals.get((f"{name}.weight", 0)) or removals.get((f"{name}.running_mean", 0)) or set()
        kept = [i for i in range(original.get_submodule(name).num_features) if i not in removed]
        mean_o, var_o = _channel_moments(original, name, batches)
        mean_p, var_p = _channel_moments(pruned, name, batches)
        mean_o, var_o = mean_o[kept], var_o[kept]
        shift = mean_p - mean_o
        ratio = torch.where(var_o > 1e-12, var_p / var_o.clamp_min(1e-12), torch.ones_like(var_o))
        with torch.no_grad():
            p_mod.running_mean += shift.to(p_mod.running_mean.dtype)
            p_mod.running_var *= ratio.to(p_mod.running_var.dtype)
        report.layers[name] = (float((shift ** 2).sum()), 0.0)
