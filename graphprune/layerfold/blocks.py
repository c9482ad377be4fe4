"""Removable residual blocks: score whole blocks, then take the least useful ones out.

A *block* is an entry of an ``nn.Sequential`` or ``nn.ModuleList`` that has
parameters and sub-modules, runs exactly once per forward, returns a tensor of
the same shape as the tensor it takes, and sits in a chain (its input is the
previous entry's output, or its output is the next entry's input; a plain
``nn.Sequential`` is a chain by construction).  This finds torchvision's
``BasicBlock`` / ``Bottleneck`` without downsample and the decoder layers of
Hugging Face models (``model.model.layers[i]``); a block that changes the shape
(a downsample) is never a candidate.  Outermost blocks win over nested ones.

Scores (low = removable, reports are ranked ascending):

* ``"cosine"``, Block Influence (ShortGPT, Men et al. 2024): ``1 - cos(x, y)``
  between the block's input ``x`` and output ``y``, averaged over every
  position of every calibration batch.  The cosine is taken along the channel
  axis: axis 1 for tensors of rank >= 4 (``[N, C, H, W]``), the last axis
  otherwise (``[B, T, C]`` tokens).  Positions where ``x == y`` score exactly 0.
* ``"loss"``: the mean over batches of ``loss_fn(output with the block skipped)
  - loss_fn(output)``; by default the mean squared error between the first
  tensor of the skipped model's output and that of the unpruned model.

:func:`remove_blocks` works on a deep copy: an ``nn.Sequential`` entry becomes
``nn.Identity``; a ``ModuleList`` entry is deleted, and a Hugging Face config
follows (``num_hidden_layers``, ``layer_types``, ``no_rope_layers``; every
``layer_idx`` attribute inside the list counts 0..n-1 again).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..calibration import Calibration, run_checked
from ..errors import InvalidArgumentError, PlanError
from .collapse import eval_mode
from .plan import RankedEntries

METHODS = ("cosine", "loss")
_SHORTCUT_ATTRS = ("downsample", "shortcut")
_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")


@dataclass(frozen=True)
class BlockScore:
    """One block: where it lives, what it maps, and its score."""

    name: str  # module path, e.g. "layer1.1" or "model.layers.3"
    container: str  # path of the nn.Sequential / nn.ModuleList holding it ("" for the root)
    index: int  # position in the container
    container_kind: str  # "sequential" | "modulelist"
    type: str  # class name of the block
    score: float
    in_shape: tuple[int, ...]  # shapes seen on the first calibration batch
    out_shape: tuple[int, ...]
    params: int


@dataclass(frozen=True)
class BlockReport(RankedEntries):
    """Blocks ranked by ascending score (the first is the most removable)."""

    what = "block"

    method: str
    baseline: float | None  # mean loss of the unpruned model (``method="loss"``), else None
    entries: tuple[BlockScore, ...]

    def to_dict(self) -> dict:
        return {"method": self.method, "baseline": self.baseline, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, data: dict) -> BlockReport:
        entries = tuple(BlockScore(**{**e, "in_shape": tuple(e["in_shape"]), "out_shape": tuple(e["out_shape"])})
                        for e in data["entries"])
        return cls(method=data["method"], baseline=data["baseline"], entries=entries)


# -- tensors in and out of a block ----------------------------------------------------------------

def _first_tensor(obj):
    """The first tensor of a (nested) output: a tensor, tuple/list, dict or ModelOutput."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _block_input(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return _first_tensor(list(args) + list(kwargs.values()))


# -- finding blocks --------------------------------------------------------------------------------

@dataclass
class _Seen:
    """What the probe run saw of one module (internal)."""

    calls: int = 0
    inp: torch.Tensor | None = None
    out: torch.Tensor | None = None


def _entries(model: nn.Module) -> dict[str, tuple[str, str, int, str]]:
    """Every entry of every Sequential / ModuleList: path -> (container, key, index, kind)."""
    out = {}
    for path, mod in model.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)):
            kind = "sequential" if isinstance(mod, nn.Sequential) else "modulelist"
            for index, key in enumerate(mod._modules):
                out[f"{path}.{key}" if path else key] = (path, key, index, kind)
    return out


def _probe(model: nn.Module, names, batch) -> dict[str, _Seen]:
    """Run one batch, recording calls, first input and first output tensor of ``names``."""
    modules = dict(model.named_modules())
    seen = {n: _Seen() for n in names}

    def hook(s: _Seen):
        def fn(mod, args, kwargs, output):
            s.calls += 1
            s.inp, s.out = _block_input(args, kwargs), _first_tensor(output)
        return fn

    handles = [modules[n].register_forward_hook(hook(seen[n]), with_kwargs=True) for n in names]
    try:
        run_checked(model, batch, 0)
    finally:
        for h in handles:
            h.remove()
    return seen


def _preserves_shape(s: _Seen) -> bool:
    return s.calls == 1 and s.inp is not None and s.out is not None and s.inp.shape == s.out.shape


def _chained(model: nn.Module, entries: dict, seen: dict[str, _Seen], name: str) -> bool:
    container, _, index, _ = entries[name]
    holder = model.get_submodule(container)
    if isinstance(holder, nn.Sequential) and type(holder).forward is nn.Sequential.forward:
        return True
    keys = list(holder._modules)
    siblings = [f"{container}.{k}" if container else k for k in keys]
    prev = seen.get(siblings[index - 1]) if index > 0 else None
    nxt = seen.get(siblings[index + 1]) if index + 1 < len(siblings) else None
    me = seen[name]
    return (prev is not None and prev.out is not None and me.inp is prev.out) or (
        nxt is not None and nxt.inp is not None and nxt.inp is me.out)


def _auto_blocks(model: nn.Module, entries: dict, seen: dict[str, _Seen]) -> list[str]:
    modules = dict(model.named_modules())
    found = [n for n in entries
             if any(True for _ in modules[n].children()) and any(True for _ in modules[n].parameters())
             and _preserves_shape(seen[n]) and _chained(model, entries, seen, n)]
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def _check_named(model: nn.Module, names, entries: dict) -> list[str]:
    """Validate explicit block names (exist, are container entries, unique, not nested)."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise InvalidArgumentError("blocks must be a list of module names (strings)")
    names = list(names)
    if not names:
        raise InvalidArgumentError("blocks is empty: name at least one block, or pass blocks=None")
    modules = dict(model.named_modules())
    for n in names:
        if n not in modules or not n:
            raise InvalidArgumentError(f"no module named {n!r} in the model")
        if n not in entries:
            raise PlanError(f"block {n!r} is not an entry of an nn.Sequential or nn.ModuleList; only such entries "
                            f"can be removed")
        if names.count(n) > 1:
            raise InvalidArgumentError(f"block {n!r} is named twice")
        outer = [o for o in names if n.startswith(o + ".")]
        if outer:
            raise InvalidArgumentError(f"block {n!r} lies inside block {outer[0]!r}; name only one of them")
    return names


def _require_shape(name: str, s: _Seen) -> None:
    if s.calls != 1:
        raise PlanError(f"block {name!r} ran {s.calls} times on one batch; only blocks that run exactly once "
                        f"can be scored or removed")
    if s.inp is None or s.out is None or s.inp.shape != s.out.shape:
        shapes = (f"{list(s.inp.shape) if s.inp is not None else '?'} -> "
                  f"{list(s.out.shape) if s.out is not None else '?'}")
        raise PlanError(f"block {name!r} changes the shape {shapes} (a downsample?); only shape-preserving "
                        f"blocks can be scored or removed")


# -- scoring --------------------------------------------------------------------------------------

def _one_minus_cosine(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Sum over positions of ``1 - cos`` along the channel axis, and the number of positions."""
    x, y = x.detach().double(), y.detach().double()
    axis = 1 if x.dim() >= 4 else x.dim() - 1
    x = x.movedim(axis, -1).reshape(-1, x.shape[axis])
    y = y.movedim(axis, -1).reshape(-1, y.shape[axis])
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)
    cos = (x * y).sum(-1) / (nx * ny).clamp_min(1e-300)
    cos = torch.where((nx == 0) & (ny == 0), torch.ones_like(cos), cos)
    cos = torch.where((x == y).all(-1), torch.ones_like(cos), cos.clamp(-1.0, 1.0))
    return float((1.0 - cos).sum()), cos.numel()


def _cosine_scores(model: nn.Module, names: list[str], batches) -> dict[str, float]:
    modules = dict(model.named_modules())
    sums = {n: [0.0, 0] for n in names}
    inputs: dict[str, torch.Tensor] = {}

    def pre(name):
        def fn(mod, args, kwargs):
            inputs[name] = _block_input(args, kwargs).detach().clone()  # before any in-place change
        return fn

    def post(name):
        def fn(mod, args, kwargs, output):
            total, count = _one_minus_cosine(inputs.pop(name), _first_tensor(output))
            sums[name][0] += total
            sums[name][1] += count
        return fn

    handles = [h for n in names for h in (modules[n].register_forward_pre_hook(pre(n), with_kwargs=True),
                                          modules[n].register_forward_hook(post(n), with_kwargs=True))]
    try:
        for i, batch in enumerate(batches):
            run_checked(model, batch, i)
    finally:
        for h in handles:
            h.remove()
    return {n: s / max(c, 1) for n, (s, c) in sums.items()}


@contextlib.contextmanager
def _skipping(mod: nn.Module):
    """Within the context ``mod`` returns its input unchanged (an instance attribute
    shadows ``forward``; removed on exit, so the module is left as it was)."""
    mod.forward = lambda *args, **kwargs: _block_input(args, kwargs)
    try:
        yield
    finally:
        del mod.forward


def _mse(out, ref) -> torch.Tensor:
    a, b = _first_tensor(out), _first_tensor(ref)
    return (a.double() - b.double()).pow(2).mean()


def _loss_scores(model: nn.Module, names: list[str], batches, loss_fn):
    """``({name: mean loss increase}, mean baseline loss)`` over the calibration batches."""
    modules = dict(model.named_modules())
    totals = dict.fromkeys(names, 0.0)
    base_total, count = 0.0, 0
    for i, batch in enumerate(batches):
        ref = run_checked(model, batch, i)
        base = float(loss_fn(ref)) if loss_fn is not None else 0.0
        for n in names:
            with _skipping(modules[n]):
                out = run_checked(model, batch, i)
            loss = float(loss_fn(out)) if loss_fn is not None else float(_mse(out, ref))
            totals[n] += loss - base
        base_total += base
        count += 1
    return {n: t / count for n, t in totals.items()}, base_total / count


def _check_args(model, method, loss_fn) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidArgumentError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if loss_fn is not None and method != "loss":
        raise InvalidArgumentError("loss_fn is only used with method='loss'")


def _score(model: nn.Module, cal: Calibration, names, entries: dict, method: str, loss_fn):
    """Probe the first batch (find / check blocks), then score over all batches, iterating
    ``cal`` once (a one-shot iterable of batches works)."""
    batches = iter(cal)
    first = next(batches)
    seen = _probe(model, list(entries), first)
    if names is None:
        names = _auto_blocks(model, entries, seen)
    for n in names:
        _require_shape(n, seen[n])
    if not names:
        raise PlanError("no shape-preserving blocks found in any nn.Sequential / nn.ModuleList; "
                        "name them with blocks=[...]")
    batches = itertools.chain([first], batches)
    if method == "cosine":
        return names, seen, _cosine_scores(model, names, batches), None
    scores, baseline = _loss_scores(model, names, batches, loss_fn)
    return names, seen, scores, baseline


def block_report(model: nn.Module, calibration, blocks=None, method: str = "cosine", loss_fn=None,
                 max_batches: int | None = None) -> BlockReport:
    """Score residual blocks of ``model`` on calibration data (see the module docstring).

    ``blocks``: None finds them automatically; else a list of module names, each
    an entry of an ``nn.Sequential`` / ``nn.ModuleList`` that preserves the shape
    (a downsample block raises :class:`PlanError` naming it).  ``loss_fn(output)``
    returns a scalar (``method="loss"`` only).  ``model`` is untouched (its mode is
    restored); blocks run in eval mode without gradients.
    """
    _check_args(model, method, loss_fn)
    cal = Calibration(calibration, max_batches, desc="block report")
    entries = _entries(model)
    names = None if blocks is None else _check_named(model, blocks, entries)
    with eval_mode(model):
        names, seen, scores, baseline = _score(model, cal, names, entries, method, loss_fn)
    modules = dict(model.named_modules())
    rows = [BlockScore(name=n, container=entries[n][0], index=entries[n][2], container_kind=entries[n][3],
                       type=type(modules[n]).__name__, score=float(scores[n]), in_shape=tuple(seen[n].inp.shape),
                       out_shape=tuple(seen[n].out.shape), params=sum(p.numel() for p in modules[n].parameters()))
            for n in names]
    rows.sort(key=lambda r: r.score)
    return BlockReport(method=method, baseline=baseline, entries=tuple(rows))


# -- removal --------------------------------------------------------------------------------------

def _chosen(report_or_names, k) -> tuple[list[str], BlockReport | None]:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise InvalidArgumentError(f"k must be a non-negative integer, got {k!r}")
    if isinstance(report_or_names, BlockReport):
        if k is None:
            raise InvalidArgumentError("k is required with a BlockReport (how many of its blocks to remove)")
        names, report = report_or_names.names(), report_or_names
    elif isinstance(report_or_names, str):
        names, report = [report_or_names], None
    elif isinstance(report_or_names, (list, tuple)) and all(isinstance(n, str) for n in report_or_names):
        names, report = list(report_or_names), None
    else:
        raise InvalidArgumentError(f"expected a BlockReport or a list of block names, "
                                   f"got {type(report_or_names).__name__}")
    if k is not None and k > len(names):
        raise InvalidArgumentError(f"k={k} but only {len(names)} blocks are available")
    return (names if k is None else names[:k]), report


def _static_shape_check(name: str, block: nn.Module) -> None:
    """Without measured shapes: refuse a block that carries a projection shortcut."""
    for attr in _SHORTCUT_ATTRS:
        sub = getattr(block, attr, None)
        if isinstance(sub, nn.Module) and any(True for _ in sub.parameters()):
            raise PlanError(f"block {name!r} has a {attr} ({type(sub).__name__}): it changes the shape and "
                            f"cannot be replaced by nn.Identity")


def _hf_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def _fix_hf(model: nn.Module, layers: nn.ModuleList, old_len: int, kept: list[int]) -> None:
    """Config and ``layer_idx`` attributes of a decoder stack after entries were deleted."""
    config = _hf_config(model)
    if config is None or getattr(config, "num_hidden_layers", None) != old_len:
        return
    if getattr(config, "is_heterogeneous", False):
        raise PlanError("the config has a per_layer_config (heterogeneous layers); removing layers from it is "
                        "not supported")
    config.num_hidden_layers = len(kept)
    for attr in _PER_LAYER_CONFIG_LISTS:
        values = getattr(config, attr, None)
        if isinstance(values, (list, tuple)) and len(values) == old_len:
            setattr(config, attr, type(values)(values[i] for i in kept))
    for i, layer in enumerate(layers):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int) and not isinstance(mod.layer_idx, bool):
                mod.layer_idx = i


def _validate_removal(model: nn.Module, names: list[str], report: BlockReport | None, entries: dict) -> None:
    if names:
        _check_named(model, names, entries)
    for n in names:
        row = next((e for e in report.entries if e.name == n), None) if report is not None else None
        if row is not None and tuple(row.in_shape) != tuple(row.out_shape):
            raise PlanError(f"block {n!r} changes the shape {list(row.in_shape)} -> {list(row.out_shape)}; "
                            f"only shape-preserving blocks can be removed")
        if row is None and entries[n][3] == "sequential":
            _static_shape_check(n, model.get_submodule(n))


def _check_runs(original: nn.Module, slim: nn.Module, example_inputs) -> None:
    """Run both models once in eval mode (modes restored); equal output shapes or PlanError."""
    with eval_mode(original):
        ref = _first_tensor(run_checked(original, example_inputs, 0))
    with eval_mode(slim):
        try:
            out = _first_tensor(run_checked(slim, example_inputs, 0))
        except InvalidArgumentError as err:
            raise PlanError(f"the model with blocks removed does not run: {err}") from err
    if ref is not None and out is not None and ref.shape != out.shape:
        raise PlanError(f"removing the blocks changed the output shape {list(ref.shape)} -> {list(out.shape)}")


def remove_blocks(model: nn.Module, report_or_names, k: int | None = None, example_inputs=None) -> nn.Module:
    """A deep copy of ``model`` without the chosen blocks (``model`` is untouched).

    ``report_or_names``: a :class:`BlockReport` (the ``k`` lowest-scoring blocks
    are removed; ``k`` is required) or block names (all of them, or the first ``k``).
    Shapes are checked from the report; with bare names a Sequential entry that
    carries a ``downsample`` / ``shortcut`` with parameters is refused.  With
    ``example_inputs`` the result is run once and must give the original output
    shape.  Errors are :class:`InvalidArgumentError` / :class:`PlanError` naming
    the block.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names, report = _chosen(report_or_names, k)
    entries = _entries(model)
    _validate_removal(model, names, report, entries)
    slim = copy.deepcopy(model)
    deleted: dict[str, list[int]] = {}
    for n in names:
        container, key, index, kind = entries[n]
        holder = slim.get_submodule(container)
        if kind == "sequential":
            setattr(holder, key, nn.Identity())
        else:
            deleted.setdefault(container, []).append(index)
    for container, indices in deleted.items():
        layers = slim.get_submodule(container)
        old_len = len(layers)
        for index in sorted(indices, reverse=True):
            del layers[index]
        _fix_hf(slim, layers, old_len, [i for i in range(old_len) if i not in indices])
    if example_inputs is not None:
        _check_runs(model, slim, example_inputs)
    return slim
