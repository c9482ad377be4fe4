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

from ..capture.torch_ops import base_class
from ..errors import PlanError
from ..planning.plan import PruningPlan
from .attention_modules import HeadPrunedMultiheadAttention, window_attention_class

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


@module_rule(nn.LayerNorm, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
def _ln(mod, old):
    if mod.weight is not None:
        mod.normalized_shape = tuple(mod.weight.shape)


@module_rule(nn.Embedding)
def _embedding(mod, old):
    mod.num_embeddings, mod.embedding_dim = mod.weight.shape


@module_rule(nn.MultiheadAttention)
def _mha(mod, old):
    _fit_mha(mod, "")


def _old_attrs(mod) -> dict:
    return {k: getattr(mod, k) for k in ("out_channels", "groups") if hasattr(mod, k)}


def _check(model: nn.Module, plan: PruningPlan, tensors: dict) -> None:
    for (name, axis), removed in plan.removals().items():
        if name not in tensors:
            raise PlanError(f"plan names '{name}', which {type(model).__name__} does not have")
        t = tensors[name]
        if axis >= t.dim() or (removed and max(removed) >= t.shape[axis]):
            raise PlanError(f"plan does not fit '{name}' of shape {tuple(t.shape)} (axis {axis})")


def _aliases(model: nn.Module) -> dict[str, str]:
    """Every parameter name -> the first name of the same tensor (tied weights)."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)}


def apply_torch(model: nn.Module, plan: PruningPlan, inplace: bool = False) -> nn.Module:
    """Return a physically smaller model (a deep copy unless ``inplace``).

    Tied parameters (one tensor under several names, e.g. an LM head tied to
    the embedding) are sliced once and stay tied.
    """
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    _check(model, plan, tensors)
    alias = _aliases(model)
    by_name: dict[str, list[tuple[int, set[int]]]] = {}
    for (name, axis), removed in plan.removals().items():
        if removed:
            cuts = by_name.setdefault(alias.get(name, name), [])
            if (axis, removed) not in cuts:
                cuts.append((axis, removed))
    with torch.no_grad():
        sliced = {id(tensors[name]): _sliced(tensors[name], cuts) for name, cuts in by_name.items()}
    # The copy takes the sliced tensors in place of the originals (deepcopy's memo), so the
    # full-size tensors that are cut are never copied; tied tensors stay one object.
    target = model if inplace else copy.deepcopy(model, memo=dict(sliced))
    old_attrs: dict[str, tuple[nn.Module, dict]] = {}
    for name in by_name:
        owner_path, _, attr = name.rpartition(".")
        owner = target.get_submodule(owner_path)
        old_attrs.setdefault(owner_path, (owner, _old_attrs(owner)))
        if inplace:
            _assign(owner, attr, sliced[id(tensors[name])])
    for name, canon in alias.items():
        if name != canon and canon in by_name:
            owner_path, _, attr = name.rpartition(".")
            owner = target.get_submodule(owner_path)
            old_attrs.setdefault(owner_path, (owner, _old_attrs(owner)))
            canon_owner, _, canon_attr = canon.rpartition(".")
            owner._parameters[attr] = getattr(target.get_submodule(canon_owner), canon_attr)
    for mod, old in old_attrs.values():
        rule = _find_rule(mod)
        if rule is not None:
            rule(mod, old)
    rewrite_head_counts(target)
    return target


# -- attention modules: head counts follow the projections ------------------------

HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
_Q = ("q_proj", "query", "q", "q_lin")
_K = ("k_proj", "key", "k", "k_lin")
_FUSED = ("c_attn", "qkv", "Wqkv", "query_key_value")  # q, k, v packed in one projection
_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def _proj_width(mod: nn.Module | None) -> int | None:
    if isinstance(mod, nn.Linear):
        return mod.out_features
    if mod is not None and type(mod).__name__ == "Conv1D":
        return mod.weight.shape[1]
    return None


def _head_counts(attn: nn.Module, hd: int) -> tuple[int, int] | None:
    """(query heads, KV heads) implied by ``attn``'s projection widths."""
    for q, k in zip(_Q, _K):
        wq, wk = _proj_width(getattr(attn, q, None)), _proj_width(getattr(attn, k, None))
        if wq is not None:
            return wq // hd, (wk // hd if wk is not None else wq // hd)
    for f in _FUSED:
        w = _proj_width(getattr(attn, f, None))
        if w is not None and w % 3 == 0:
            return w // 3 // hd, w // 3 // hd
    return None


def rewrite_head_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Make every attention module's head-count attributes match its projections.

    An attention module is one with an integer head-dim attribute
    (:data:`HEAD_DIM_ATTRS`) and q/k projections (or a packed qkv) as
    children, an ``nn.MultiheadAttention``, or a Swin window attention
    (:data:`WINDOW_ATTENTION`, heads read from its per-head table).  Whole
    heads are removed by apply, so ``head_dim`` is unchanged and
    ``num_heads``-style attributes, ``num_key_value_groups``,
    ``all_head_size``, timm's ``attn_dim`` and GPT-2's ``split_size`` are
    set from the widths; torchvision modules whose attention width no longer
    equals their input width get a forward that reads it
    (:mod:`~graphprune.apply.attention_modules`).
    Returns ``{module name: (heads, kv_heads)}`` of every attention module.
    Raises :class:`PlanError` when a projection is not a whole number of heads.
    """
    counts_of = {}
    for name, attn in model.named_modules():
        cls = base_class(attn)
        if cls is nn.MultiheadAttention:
            counts_of[name] = _fit_mha(attn, name)
            continue
        if f"{cls.__module__}.{cls.__name__}" in WINDOW_ATTENTION:
            counts_of[name] = _fit_window(attn, name)
            continue
        hd = next((getattr(attn, a) for a in HEAD_DIM_ATTRS if isinstance(getattr(attn, a, None), int)), None)
        counts = _head_counts(attn, hd) if hd else None
        if counts is None:
            continue
        heads, kv = counts
        widths = [_proj_width(getattr(attn, n, None)) for n in _Q + _K + _FUSED]
        if any(w is not None and w % hd for w in widths):
            raise PlanError(f"'{name}': projection widths {[w for w in widths if w]} are not whole heads of {hd}")
        if not kv or heads % kv:
            raise PlanError(f"'{name}': {heads} query heads cannot share {kv} KV heads evenly "
                            f"(grouped-query attention needs a multiple)")
        new = {a: heads for a in _HEADS} | {a: kv for a in _KV_HEADS}
        new |= {"num_key_value_groups": heads // max(kv, 1), "all_head_size": heads * hd, "split_size": heads * hd,
                "attn_dim": heads * hd}
        for a, v in new.items():
            if isinstance(getattr(attn, a, None), int) and getattr(attn, a) != v:
                setattr(attn, a, v)
        counts_of[name] = (heads, kv)
    return counts_of


# Window attentions whose heads are the columns of ``relative_position_bias_table``.
WINDOW_ATTENTION = ("timm.models.swin_transformer.WindowAttention",
                    "torchvision.models.swin_transformer.ShiftedWindowAttention")


def _fit_mha(mod: nn.MultiheadAttention, name: str) -> tuple[int, int]:
    """``num_heads`` from the packed rows (``head_dim`` kept), embed dims from
    the columns; the head-aware forward once attention and embedding widths differ."""
    inner, embed = mod.in_proj_weight.shape[0] // 3, mod.in_proj_weight.shape[1]
    if inner % mod.head_dim:
        raise PlanError(f"'{name}': attention width {inner} is not whole heads of {mod.head_dim}")
    mod.num_heads = inner // mod.head_dim
    mod.embed_dim = mod.kdim = mod.vdim = embed
    if type(mod) is nn.MultiheadAttention and (inner != embed or mod.out_proj.out_features != embed):
        mod.__class__ = HeadPrunedMultiheadAttention
    return mod.num_heads, mod.num_heads


def _fit_window(mod: nn.Module, name: str) -> tuple[int, int]:
    """``num_heads`` = columns of the per-head table; torchvision's module gets
    the head-aware forward once its attention width differs from its input width."""
    heads, inner = mod.relative_position_bias_table.shape[1], mod.qkv.out_features // 3
    if inner % heads or mod.proj.in_features != inner:
        raise PlanError(f"'{name}': qkv width {inner} / proj input {mod.proj.in_features} "
                        f"are not {heads} whole heads")
    mod.num_heads = heads
    cls = type(mod)
    if cls.__module__.startswith("torchvision.") and (inner != mod.qkv.in_features
                                                      or mod.proj.out_features != mod.qkv.in_features):
        mod.__class__ = window_attention_class()
    return heads, heads


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


def _sliced(t: torch.Tensor, cuts) -> torch.Tensor:
    """``t`` without the ``removed`` positions of each ``(axis, removed)`` cut; a
    Parameter stays a Parameter (same ``requires_grad``)."""
    new = t.detach()
    for axis, removed in cuts:
        keep = [i for i in range(new.shape[axis]) if i not in removed]
        new = new.index_select(axis, torch.tensor(keep, dtype=torch.long, device=new.device))
    return nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def _assign(owner: nn.Module, attr: str, new: torch.Tensor) -> None:
    if attr in owner._parameters:
        owner._parameters[attr] = new
    else:
        owner._buffers[attr] = new
