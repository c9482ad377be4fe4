"""Apply a :class:`PruningPlan` to a PyTorch model.

Parameters and buffers are sliced along the planned axes, then every module
whose tensors changed has its size attributes rewritten by the rule for its
type (one rule per module kind in :data:`MODULE_RULES`), so the result keeps
its class and ``state_dict()`` describes the new shapes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import PlanError
from ..planning.plan import PruningPlan

MODULE_RULES: dict[type, callable] = {}


def module_rule(*types):
    def deco(fn):
        for t in types:
            MODULE_RULES[t] = fn
        return fn
    return deco


@module_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(mod: nn.Module, old: dict) -> None:
    """Grouped convs lose whole groups: ``groups`` shrinks, per-group widths stay."""
    w = mod.weight
    if mod.groups > 1:
        per_group_out = old["out_channels"] // old["groups"]
        mod.groups = w.shape[0] // per_group_out
        mod.in_channels = mod.groups * w.shape[1]
    else:
        mod.in_channels = w.shape[1]
    mod.out_channels = w.shape[0]


@module_rule(nn.Linear)
def _linear(mod, old):
    mod.out_features, mod.in_features = mod.weight.shape


@module_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _bn(mod, old):
    ref = mod.weight if mod.weight is not None else mod.running_mean
    mod.num_features = ref.shape[0]


@module_rule(nn.LayerNorm)
def _ln(mod, old):
    if mod.weight is not None:
        mod.normalized_shape = tuple(mod.weight.shape)


@module_rule(nn.MultiheadAttention)
def _mha(mod, old):
    e = mod.in_proj_weight.shape[1]
    mod.embed_dim = mod.kdim = mod.vdim = e
    mod.head_dim = e // mod.num_heads
    _linear(mod.out_proj, {})


def _old_attrs(mod) -> dict:
    return {k: getattr(mod, k) for k in ("out_channels", "groups") if hasattr(mod, k)}


def _check(model: nn.Module, plan: PruningPlan, tensors: dict) -> None:
    for (name, axis), removed in plan.removals().items():
        if name not in tensors:
            raise PlanError(f"plan names '{name}', which {type(model).__name__} does not have")
        t = tensors[name]
        if axis >= t.dim() or (removed and max(removed) >= t.shape[axis]):
            raise PlanError(f"plan does not fit '{name}' of shape {tuple(t.shape)} (axis {axis})")


def apply_torch(model: nn.Module, plan: PruningPlan, inplace: bool = False) -> nn.Module:
    """Return a physically smaller model (a deep copy unless ``inplace``)."""
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    _check(model, plan, tensors)
    target = model if inplace else copy.deepcopy(model)
    by_name: dict[str, list[tuple[int, set[int]]]] = {}
    for (name, axis), removed in plan.removals().items():
        if removed:
            by_name.setdefault(name, []).append((axis, removed))
    old_attrs: dict[str, tuple[nn.Module, dict]] = {}
    with torch.no_grad():
        for name, cuts in by_name.items():
            owner_path, _, attr = name.rpartition(".")
            owner = target.get_submodule(owner_path)
            old_attrs.setdefault(owner_path, (owner, _old_attrs(owner)))
            _replace(owner, attr, cuts)
    for mod, old in old_attrs.values():
        rule = _find_rule(mod)
        if rule is not None:
            rule(mod, old)
    return target


def _conv1d_hf(mod, old):
    """Hugging Face ``Conv1D`` (GPT-2): weight ``[in, out]``, ``nf`` outputs."""
    mod.nf = mod.weight.shape[1]


NAMED_RULES = {"Conv1D": _conv1d_hf}  # classes of optional packages, matched by name


def _find_rule(mod):
    for cls in type(mod).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
        if cls.__name__ in NAMED_RULES and cls.__module__.startswith("transformers"):
            return NAMED_RULES[cls.__name__]
    return None


def _replace(owner: nn.Module, attr: str, cuts) -> None:
    t = getattr(owner, attr)
    new = t.detach()
    for axis, removed in cuts:
        keep = [i for i in range(new.shape[axis]) if i not in removed]
        new = new.index_select(axis, torch.tensor(keep, dtype=torch.long, device=new.device))
    new = new.clone()
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(new, requires_grad=t.requires_grad)
    else:
        owner._buffers[attr] = new
