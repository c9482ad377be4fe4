"""Calibration data: normalise what users pass, and iterate it with progress.

Accepted: one batch (a tensor, a tuple of positional tensors, or a dict of
keyword tensors, as a tokenizer returns), a list of such batches, or any
iterable of them (a ``DataLoader``).  A ``(inputs, labels)`` pair from a
labelled DataLoader is read as inputs only when ``labels`` is a 1-D integer
tensor.  Iteration stops after ``max_batches``; a tqdm bar is shown only when
stderr is a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import torch

from .errors import InvalidArgumentError


def _is_batch(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())
    if isinstance(obj, tuple):
        return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj)
    return False


def _strip_labels(batch):
    if (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor)
            and batch[1].dim() == 1 and not batch[1].is_floating_point() and isinstance(batch[0], torch.Tensor)):
        return batch[0]
    return tuple(batch) if isinstance(batch, list) else batch


class Calibration:
    """Re-iterable view of calibration data (configuration only; iterate to use)."""

    def __init__(self, data, max_batches: int | None = None, desc: str = "calibration"):
        if data is None:
            raise InvalidArgumentError("calibration data is required here "
                                       "(a tensor, a list of batches or a DataLoader)")
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 1):
            raise InvalidArgumentError(f"max_batches must be a positive integer, got {max_batches!r}")
        self.data = data
        self.max_batches = max_batches
        self.desc = desc

    def _source(self) -> Iterable:
        if _is_batch(self.data):
            return [self.data]
        if isinstance(self.data, (str, bytes)) or not isinstance(self.data, Iterable):
            raise InvalidArgumentError(f"calibration data must be a tensor, a list of batches or a DataLoader, "
                                       f"got {type(self.data).__name__}")
        return self.data

    def __iter__(self) -> Iterator:
        source = self._source()
        total = self.max_batches
        if total is None and hasattr(source, "__len__"):
            total = len(source)
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, desc=self.desc, leave=False)
        count = 0
        for batch in source:
            if self.max_batches is not None and count >= self.max_batches:
                break
            batch = _strip_labels(batch)
            if not _is_batch(batch):
                raise InvalidArgumentError(f"calibration batch {count} is a {type(batch).__name__}, "
                                           f"not a tensor, tuple of tensors or dict of tensors")
            count += 1
            if bar is not None:
                bar.update(1)
            yield batch
        if bar is not None:
            bar.close()
        if count == 0:
            raise InvalidArgumentError("calibration data is empty")


def default_loss(output) -> torch.Tensor:
    """A label-free loss: cross-entropy against the model's own predictions
    for ``[N, C]`` logits, else half the mean square of the first output."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise InvalidArgumentError("the model returned no tensor to differentiate")
    y = leaves[0].float()
    if y.dim() == 2 and y.shape[1] > 1:
        return torch.nn.functional.cross_entropy(y, y.argmax(1).detach())
    return 0.5 * y.pow(2).mean()


def gradient_statistics(model: torch.nn.Module, calibration: Calibration, statistic: str,
                        loss_fn=None) -> dict:
    """Per-parameter arrays for data-driven criteria (on a copy; ``model`` untouched).

    ``"taylor"``: ``w * mean(grad)`` (first-order change of the loss when a
    slice is removed, summed over the slice by the criterion).
    ``"fisher"``: ``w**2 * mean(grad**2)`` (diagonal empirical Fisher / OBD).
    """
    import copy

    work = copy.deepcopy(model).eval()
    params = dict(work.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for batch in calibration:
        work.zero_grad(set_to_none=True)
        out = run_checked(work, batch, count)
        (loss_fn or default_loss)(out).backward()
        for n, p in params.items():
            if p.grad is not None:
                g = p.grad.double()
                acc[n] += g if statistic == "taylor" else g * g
        count += 1
    out = {}
    for n, p in params.items():
        w = p.detach().double()
        mean = acc[n] / max(count, 1)
        out[n] = (w * mean if statistic == "taylor" else w * w * mean).float().numpy()
    return out


def activation_statistics(model: torch.nn.Module, calibration: Calibration, statistic: str,
                          layers=None, norms=None) -> dict:
    """Per-parameter arrays from forward hooks on Conv/Linear layers (model untouched).

    ``"activation"``: for ``<layer>.weight``, the mean |output| of each output
    channel (1-D over axis 0).  ``"wanda"``: ``|W| * ||X||``, the weight
    magnitude times the L2 norm of the input channel it reads (same shape as
    the weight).  ``"gram"``: see :func:`gram_statistics` (``layers`` limits
    it to those weight names, ``norms`` weights rows as compensation does).
    Layers the data never reaches are absent.
    """
    if statistic == "gram":
        return gram_statistics(model, calibration, layers, norms)
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name, channel_axis):
        def fn(mod, args, out):
            t = (args[0] if statistic == "wanda" else out).detach().double()
            axis = channel_axis(t)
            dims = [d for d in range(t.dim()) if d != axis]
            val = t.pow(2).sum(dims) if statistic == "wanda" else t.abs().mean(dims)
            sums[name] = sums.get(name, 0) + val
            counts[name] = counts.get(name, 0) + 1
        return fn

    handles = [m.register_forward_hook(hook(n, (lambda t: t.dim() - 1) if isinstance(m, torch.nn.Linear)
                                            else (lambda t: 1)))
               for n, m in layers.items()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(calibration):
                run_checked(model, batch, i)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    out = {}
    for name, total in sums.items():
        w = layers[name].weight.detach().double()
        if statistic == "wanda":
            norm = total.sqrt()
            shape = [1, -1] + [1] * (w.dim() - 2)
            out[f"{name}.weight"] = (w.abs() * norm.reshape(shape)).float().numpy()
        else:
            out[f"{name}.weight"] = (total / counts[name]).float().numpy()
    return out


def input_rows(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``[rows, D]`` inputs a Linear or (ungrouped) Conv2d multiplies by
    its flattened ``[out, D]`` weight: the last axis of a Linear's input, the
    ``F.unfold`` patches of a Conv2d (column ``c * kh * kw + i * kw + j``)."""
    if isinstance(mod, torch.nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = torch.nn.functional.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def real_tokens(batch, x: torch.Tensor, mod: torch.nn.Module):
    """Boolean mask over the rows of :func:`input_rows` that are real tokens,
    when ``batch`` carries a tokenizer's ``attention_mask`` shaped like the
    first two axes of a Linear's 3-D input; ``None``: every row counts.
    Padding positions compute values no output reads."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if (mask is None or not isinstance(mod, torch.nn.Linear) or x.dim() != 3
            or tuple(x.shape[:2]) != tuple(mask.shape)):
        return None
    return mask.reshape(-1).bool()


MAX_GRAM_DIM = 8192  # wider inputs get no Gram matrix (memory D^2, inversion D^3)


def gram_layers(model: torch.nn.Module, names=None) -> dict:
    """Linear and ungrouped Conv2d layers by name whose flattened input is at
    most :data:`MAX_GRAM_DIM` wide (only ``<name>.weight`` in ``names``, if given)."""
    out = {}
    for n, m in model.named_modules():
        ok = isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.groups == 1)
        if ok and m.weight[0].numel() <= MAX_GRAM_DIM and (names is None or f"{n}.weight" in names):
            out[n] = m
    return out


def norm_modules(model: torch.nn.Module, norm_inputs: dict, consumers) -> dict[str, str]:
    """``{layer: norm module}`` for the ``consumers`` (module names) whose
    output the captured graph showed to reach a LayerNorm/RMSNorm input only
    through additions (``norm_inputs``: weight name -> norm weight name, from
    :func:`graphprune.ir.query.normalised_sums`), when the layer is an
    ``nn.Linear`` and the norm an ``nn.LayerNorm``/``nn.RMSNorm`` over the
    last axis (its forward's first input is then exactly the normalised sum)."""
    out = {}
    for weight, norm_weight in norm_inputs.items():
        layer, norm = weight.rpartition(".")[0], norm_weight.rpartition(".")[0]
        if layer not in consumers:
            continue
        try:
            mod, lin = model.get_submodule(norm), model.get_submodule(layer)
        except AttributeError:
            continue
        if (isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm)) and len(mod.normalized_shape) == 1
                and isinstance(lin, torch.nn.Linear)):
            out[layer] = norm
    return out


def norm_scale(mod: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``[rows, 1]``: the square of what ``mod`` (LayerNorm or RMSNorm) divides
    each row of its ``[rows, width]`` input ``z`` by, so ``error / scale`` is
    the squared error it passes on (to first order, before its affine weight)."""
    eps = mod.eps if mod.eps is not None else torch.finfo(torch.float32).eps
    if isinstance(mod, torch.nn.LayerNorm):
        return z.var(1, unbiased=False, keepdim=True) + eps
    return z.pow(2).mean(1, keepdim=True) + eps


def gram_statistics(model: torch.nn.Module, calibration: Calibration, layers=None, norms=None) -> dict:
    """``{"<layer>.weight": X^T X}`` (float32, ``[D, D]``) of every Linear and
    ungrouped Conv2d input (:func:`gram_layers`) on the calibration data, over real tokens only
    (:func:`real_tokens`), for the reconstruction criterion
    (:mod:`graphprune.scoring.reconstruction`).  ``layers``: weight names to
    collect (default all).  ``norms`` (:func:`norm_modules`): a layer that
    feeds a norm gets each row weighted by one over :func:`norm_scale` of
    that norm's input, as least-squares compensation weights it.  The model
    is untouched; layers the data never reaches are absent."""
    mods = gram_layers(model, layers)
    norms = {k: v for k, v in (norms or {}).items() if k in mods}
    grams: dict[str, torch.Tensor] = {}
    current: dict = {}
    pending: dict = {}

    def hook(name):
        def fn(mod, args):
            if name in norms:
                pending[name] = args[0].detach()
            else:
                grams[name] = grams.get(name, 0) + _gram(mod, args[0].detach(), current["batch"])
        return fn

    def norm_hook(name):
        def fn(mod, args):
            z = args[0].detach()
            for layer in [n for n, m in norms.items() if m == name and n in pending]:
                x = pending.pop(layer)
                w = None  # a broadcasting residual: rows do not pair up, unweighted (as compensation)
                if z.shape[:-1] == x.shape[:-1]:
                    w = 1.0 / norm_scale(mod, z.reshape(-1, z.shape[-1]).double())
                grams[layer] = grams.get(layer, 0) + _gram(mods[layer], x, current["batch"], weights=w)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    handles += [model.get_submodule(n).register_forward_pre_hook(norm_hook(n)) for n in set(norms.values())]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(calibration):
                current["batch"] = batch
                run_checked(model, batch, i)
                for layer, x in pending.items():  # the norm never ran: unweighted
                    grams[layer] = grams.get(layer, 0) + _gram(mods[layer], x, batch)
                pending.clear()
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {f"{n}.weight": g.numpy() for n, g in grams.items()}


def _gram(mod, x, batch, chunk: int = 1 << 24, weights=None) -> torch.Tensor:
    """``X^T X`` of one batch's :func:`input_rows` (real tokens only), in
    float32, each row times ``weights`` (``[rows, 1]``, Linear only) if
    given; a Conv2d's patches are unfolded a few samples at a time."""
    def gram(rows, w=None):
        rows = rows.float()
        return (rows if w is None else rows * w.float()).T @ rows

    if isinstance(mod, torch.nn.Linear):
        rows = input_rows(mod, x)
        keep = real_tokens(batch, x, mod)
        if keep is not None:
            rows, weights = rows[keep], None if weights is None else weights[keep]
        return gram(rows, weights)
    per_sample = max(1, mod.weight[0].numel() * (x[0].numel() // max(x.shape[1], 1)))
    step = max(1, chunk // per_sample)
    return sum(gram(input_rows(mod, part)) for part in x.split(step))


def run_checked(model, batch, index):
    """Run ``model`` on one calibration batch; a batch that does not fit is a typed error."""
    from .capture.torch_fx import as_args

    args, kwargs = as_args(batch)
    try:
        return model(*args, **kwargs)
    except Exception as err:
        raise InvalidArgumentError(f"calibration batch {index} does not fit the model: "
                                   f"{type(err).__name__}: {str(err).strip()[:150]}") from err
