"""Keep a Hugging Face ``model.config`` in step with the pruned tensors.

After apply, every Linear / ``Conv1D`` whose output width changed is compared
with the config's MLP width (``intermediate_size``; GPT-2's ``n_inner``, whose
default is ``4 * n_embd``).  When all layers of that width shrank to the same
new width, the config says so, so ``save_pretrained`` -> ``from_pretrained``
rebuilds the pruned model.  Other widths (heads, hidden size) are not pruned
by the current rules for these models and stay as they are; unequal per-layer
widths raise :class:`PlanError` rather than writing a config that lies.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import PlanError


def _out_width(mod) -> int | None:
    if isinstance(mod, nn.Linear):
        return mod.out_features
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return mod.weight.shape[1]
    return None


def _mlp_width(config) -> tuple[str, int] | None:
    if getattr(config, "intermediate_size", None):
        return "intermediate_size", int(config.intermediate_size)
    if hasattr(config, "n_inner") and hasattr(config, "n_embd"):
        return "n_inner", int(config.n_inner or 4 * config.n_embd)
    return None


def module_widths(model: nn.Module) -> dict[str, int | None]:
    """Output width of every Linear / Conv1D, taken before apply."""
    return {n: _out_width(m) for n, m in model.named_modules()}


def update_config(before: dict, slim: nn.Module) -> None:
    """Rewrite ``slim.config``'s MLP width after pruning (no-op without a config).

    ``before``: :func:`module_widths` of the model the plan was made for.
    """
    config = getattr(slim, "config", None)
    key = _mlp_width(config) if config is not None else None
    if key is None:
        return
    name, old = key
    new = {_out_width(m) for n, m in slim.named_modules()
           if before.get(n) == old and _out_width(m) is not None}
    if not new or new == {old}:
        return
    if len(new) > 1:
        raise PlanError(f"MLP widths now differ between layers ({sorted(new)}): config.{name} cannot "
                        f"describe them; use one ratio for all MLP groups")
    setattr(config, name, new.pop())
