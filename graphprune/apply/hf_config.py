"""Keep a Hugging Face ``model.config`` in step with the pruned tensors, and
load pruned checkpoints back.

After apply, the config is rewritten where its own fields can describe the
new shapes: the MLP width (``intermediate_size``; GPT-2's ``n_inner``) when
every MLP layer has the same new width, and the head counts
(``num_attention_heads``, ``num_key_value_heads``; GPT-2's ``n_head``) when
every attention layer kept the same number of heads and the config states
``head_dim`` explicitly (otherwise ``head_dim = hidden_size / heads`` would
change).  A model of the same class is then built from the new config on
the ``meta`` device: every parameter whose shape still differs (per-layer
widths, BERT-style head sizes) is listed in ``config.graphprune_shapes``.

Invariant: with ``graphprune_shapes`` absent, ``from_pretrained`` rebuilds
the pruned model; with it present, :func:`load_pretrained` does (and
``from_pretrained`` refuses with a size mismatch rather than loading a
wrong model).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from ..errors import CaptureError
from .torch_apply import HEAD_DIM_ATTRS, _find_rule, _old_attrs, _proj_width, rewrite_head_counts

SHAPES_KEY = "graphprune_shapes"


def _mlp_width(config) -> tuple[str, int] | None:
    if getattr(config, "intermediate_size", None):
        return "intermediate_size", int(config.intermediate_size)
    if hasattr(config, "n_inner") and hasattr(config, "n_embd"):
        return "n_inner", int(config.n_inner or 4 * config.n_embd)
    return None


def module_widths(model: nn.Module) -> dict[str, int | None]:
    """Output width of every Linear / Conv1D, taken before apply."""
    return {n: _proj_width(m) for n, m in model.named_modules()}


def update_config(before: dict, slim: nn.Module) -> None:
    """Rewrite ``slim.config`` after pruning (no-op without a config).

    ``before``: :func:`module_widths` of the model the plan was made for.
    """
    config = getattr(slim, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    key = _mlp_width(config)
    if key is not None:
        name, old = key
        new = {_proj_width(m) for n, m in slim.named_modules()
               if before.get(n) == old and _proj_width(m) is not None}
        if len(new) == 1 and new != {old}:
            setattr(config, name, new.pop())
    _update_hidden(config, slim)
    old = _update_heads(config, slim)
    if hasattr(config, SHAPES_KEY):
        delattr(config, SHAPES_KEY)
    odd = _mismatches(config, slim)
    if old and odd:  # the config's fields cannot say the head counts: undo, and list the shapes
        _restore(config, old)
        odd = _mismatches(config, slim)
    if odd:
        setattr(config, SHAPES_KEY, odd)


_ABSENT = object()


def _update_hidden(config, slim) -> None:
    """``hidden_size`` (GPT-2: ``n_embd``) follows the input embedding's width."""
    get = getattr(slim, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if not isinstance(emb, nn.Embedding):
        return
    for name in ("hidden_size", "n_embd"):
        if isinstance(getattr(config, name, None), int) and getattr(config, name) != emb.embedding_dim:
            setattr(config, name, emb.embedding_dim)


def _update_heads(config, slim) -> dict:
    """Set the config's head counts when all attention layers agree; returns
    the previous values (to undo), ``{}`` if nothing was set.

    ``head_dim`` is written too (the LLaMA family reads it, falling back to
    ``hidden_size // heads``), so removing heads does not change it.
    """
    counts = set(rewrite_head_counts(slim).values())
    dims = {getattr(m, a) for m in slim.modules() for a in HEAD_DIM_ATTRS if isinstance(getattr(m, a, None), int)}
    if len(counts) != 1 or len(dims) != 1:
        return {}
    heads, kv = counts.pop()
    new = {n: heads for n in ("num_attention_heads", "n_head") if hasattr(config, n)}
    if getattr(config, "num_key_value_heads", None) is not None:
        new["num_key_value_heads"] = kv
    new["head_dim"] = dims.pop()
    new = {n: v for n, v in new.items() if _settable(config, n)}
    old = {n: getattr(config, n, _ABSENT) for n in new}
    for n, v in new.items():
        setattr(config, n, v)
    try:  # configs that check hidden_size % heads refuse counts they cannot describe
        if hasattr(config, "validate"):
            config.validate()
    except Exception:
        _restore(config, old)
        return {}
    return old


def _settable(config, name: str) -> bool:
    """A config field graphprune may write: not a read-only property (Falcon's ``head_dim``)."""
    attr = getattr(type(config), name, None)
    return not (isinstance(attr, property) and attr.fset is None)


def _restore(config, old: dict) -> None:
    for n, v in old.items():
        if v is _ABSENT:
            delattr(config, n)
        else:
            setattr(config, n, v)


def _mismatches(config, slim) -> dict:
    """Tensors of ``slim`` whose shape a fresh model built from ``config`` lacks."""
    try:
        with torch.device("meta"):
            fresh = type(slim)(config)
        expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    except Exception:  # a class that cannot be built from its config: list every tensor
        expected = {}
    return {k: list(v.shape) for k, v in slim.state_dict().items() if expected.get(k) != tuple(v.shape)}


def resize_to(model: nn.Module, shapes: dict) -> None:
    """Give ``model``'s named tensors the ``shapes`` (contents undefined), then
    fix every touched module's size attributes and head counts."""
    touched = {}
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    for name, shape in shapes.items():
        if name not in tensors:
            continue  # a tied or derived name
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        touched.setdefault(owner_path, (owner, _old_attrs(owner)))
        t = tensors[name]
        new = torch.zeros(tuple(shape), dtype=t.dtype)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(new, requires_grad=t.requires_grad)
        else:
            owner._buffers[attr] = new
    for mod, old in touched.values():
        rule = _find_rule(mod)
        if rule is not None:
            rule(mod, old)
    rewrite_head_counts(model)


def _state_dict_from(path: str) -> dict:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def load_pretrained(path: str, model_class=None) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after graphprune pruned it.

    Without ``config.graphprune_shapes`` this is ``from_pretrained``.  With
    it, the model is built from the config, its listed tensors are resized,
    size attributes and head counts are rewritten, and the saved weights are
    loaded strictly (tied weights re-tied).  ``model_class`` defaults to the
    class named in ``config.architectures``.  Returns the model in eval mode.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise CaptureError(f"{path}: config.architectures names no transformers class; pass model_class=")
    shapes = getattr(config, SHAPES_KEY, None)
    if not shapes:
        return model_class.from_pretrained(path).eval()
    model = model_class(config)
    resize_to(model, shapes)
    state = _state_dict_from(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or any(k not in tied and not _is_tied(model, k) for k in missing):
        raise CaptureError(f"{path}: checkpoint does not fit {model_class.__name__} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _is_tied(model: nn.Module, key: str) -> bool:
    """A missing key that is the same tensor as a loaded one (tied embeddings)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    t = tensors.get(key)
    return t is not None and any(v is t for k, v in tensors.items() if k != key)
