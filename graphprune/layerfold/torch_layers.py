"""PyTorch modules as fold layers, and the two replays of fold steps (internal to the fold pass).

:class:`Sketches` replays steps on configs and zero-bias flags (planning,
no weights); :class:`NumericState` replays them on float64 weights (apply).
Both raise :class:`FoldError` in exactly the same cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .compose import (
    ConvConfig,
    ConvLayer,
    FoldError,
    add_identity,
    affine_refusal,
    bn_affine,
    compose,
    compose_linear_chain,
    compose_refusal,
    composite_config,
    config_refusal,
    fold_bn,
    residual_refusal,
)
from .plan import FoldStep

__all__ = ["LAYERS", "NORMS", "is_layer", "is_norm", "is_passthrough", "layer_config", "to_layer", "to_module",
           "set_module", "Sketches", "NumericState"]

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def is_layer(module) -> bool:
    """A stock conv/linear (exact types: a subclass may override ``forward``)."""
    return type(module) in LAYERS


def is_norm(module) -> bool:
    """A stock BatchNorm (exact types)."""
    return type(module) in NORMS


def is_passthrough(module) -> bool:
    """Identity at inference: ``nn.Identity`` and every dropout (in eval mode)."""
    return type(module) is nn.Identity or isinstance(module, nn.modules.dropout._DropoutNd)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy()


# -- modules <-> compose layers ------------------------------------------------------------------

def _same_padding(module: nn.Module) -> tuple[int, ...]:
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    total = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
    if any(t % 2 for t in total):
        raise FoldError(f"'same' padding of kernel {tuple(module.kernel_size)} is asymmetric")
    return tuple(t // 2 for t in total)


def layer_config(module: nn.Module) -> ConvConfig:
    """The :class:`ConvConfig` of a conv/linear; 'same' padding becomes numbers (asymmetric: FoldError)."""
    if type(module) is nn.Linear:
        return ConvConfig(module.in_features, module.out_features)
    padding = _same_padding(module) if isinstance(module.padding, str) else tuple(module.padding)
    return ConvConfig(module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                      padding, tuple(module.dilation), module.groups, module.padding_mode)


def to_layer(module: nn.Module) -> ConvLayer:
    """The float64 :class:`ConvLayer` of an ``nn.ConvNd`` / ``nn.Linear`` (copied, not shared)."""
    return ConvLayer(_np(module.weight), _np(module.bias), layer_config(module))


def to_module(layer: ConvLayer, like: nn.Module) -> nn.Module:
    """An ``nn.ConvNd`` / ``nn.Linear`` holding ``layer``, on the device and in the dtype of ``like``."""
    c = layer.config
    kw = {"device": like.weight.device, "dtype": like.weight.dtype}
    has_bias = layer.bias is not None
    if not c.nd:
        module = nn.utils.skip_init(nn.Linear, c.in_channels, c.out_channels, bias=has_bias, **kw)
    else:
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[c.nd - 1]
        module = nn.utils.skip_init(cls, c.in_channels, c.out_channels, c.kernel, c.stride, c.padding, c.dilation,
                                    c.groups, has_bias, c.padding_mode, **kw)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.weight))
        if has_bias:
            module.bias.copy_(torch.from_numpy(layer.bias))
    return module.train(like.training)


def _shift(norm: nn.Module) -> np.ndarray:
    return bn_affine(_np(norm.running_mean), _np(norm.running_var), norm.eps, _np(norm.weight), _np(norm.bias))[1]


def _fold_norm(layer: ConvLayer, norm: nn.Module, where: str, force: bool) -> ConvLayer:
    c = layer.config
    w, b = fold_bn(layer.weight, layer.bias, _np(norm.running_mean), _np(norm.running_var), norm.eps,
                   _np(norm.weight), _np(norm.bias), where, c.groups, c.padding, c.padding_mode, force)
    return ConvLayer(w, b, c)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@dataclass(frozen=True)
class _Sketch:
    """What planning knows of a layer: its config and whether its bias is exactly zero."""

    config: ConvConfig
    bias_zero: bool


class Sketches:
    """Planning's weight-free replay of steps: configs and zero-bias flags only.

    A flag is true only when the bias is exactly zero (a composite: both
    biases zero; after a norm: a zero shift), so a step planned ``exact``
    is exact on the values too; :func:`apply_fold` re-checks every step on
    the values and raises :class:`PlanError` if it is not.
    """

    def __init__(self, module: Callable[[str], nn.Module]):
        self.module = module
        self.layers: dict[str, _Sketch] = {}

    def get(self, name: str) -> _Sketch:
        if name not in self.layers:
            m = self.module(name)
            self.layers[name] = _Sketch(layer_config(m), m.bias is None or not bool(m.bias.detach().any()))
        return self.layers[name]

    def replay(self, step: FoldStep) -> None:
        """Raises :class:`FoldError` (state unchanged) where the numeric replay would."""
        forced, first = step.status == "forced", self.get(step.modules[0])
        if step.kind == "bn":
            reason = affine_refusal(step.where, first.config.padding, first.config.padding_mode, forced)
            new = _Sketch(first.config, first.bias_zero and not _shift(self.module(step.modules[1])).any())
        elif step.kind == "residual":
            reason, new = residual_refusal(first.config), first
        else:
            second = self.get(step.modules[1])
            reason = config_refusal(first.config, second.config, first.bias_zero, forced)
            new = None if reason else _Sketch(composite_config(first.config, second.config),
                                              first.bias_zero and second.bias_zero)
        if reason:
            raise FoldError(reason)
        self.layers[step.modules[0]] = new


class NumericState:
    """Float64 weights of every layer a step touched; replays steps numerically (apply).

    Consecutive Linear pair folds into one module are held as a chain and
    multiplied out once, in the cheapest order (:func:`compose_linear_chain`).
    """

    def __init__(self, module: Callable[[str], nn.Module]):
        self.module = module
        self.layers: dict[str, ConvLayer | tuple[ConvLayer, ...]] = {}
        self.changed: list[str] = []
        self.cleared: list[str] = []

    def get(self, name: str) -> ConvLayer:
        layer = self.layers.get(name)
        if layer is None:
            layer = to_layer(self.module(name))
        elif isinstance(layer, tuple):
            layer = compose_linear_chain(layer)
        self.layers[name] = layer
        return layer

    def _chain(self, name: str) -> tuple[ConvLayer, ...]:
        held = self.layers.get(name)
        return held if isinstance(held, tuple) else (self.get(name),)

    def replay(self, step: FoldStep) -> None:
        """Apply one step's numerics; raises :class:`FoldError` (state unchanged) if it cannot."""
        forced = step.status == "forced"
        first = step.modules[0]
        if step.kind == "bn":
            self.layers[first] = _fold_norm(self.get(first), self.module(step.modules[1]), step.where, forced)
            self.cleared.append(step.modules[1])
        elif step.kind == "residual":
            self.layers[first] = add_identity(self.get(first))
        elif step.kind == "linear_pair" and type(self.module(first)) is nn.Linear:
            chain, second = self._chain(first), self.get(step.modules[1])
            reason = compose_refusal(chain[-1], second, forced)
            if reason:
                raise FoldError(reason)
            self.layers[first] = (*chain, second)
            self.cleared.append(step.modules[1])
        else:
            self.layers[first] = compose(self.get(first), self.get(step.modules[1]), forced)
            self.cleared.append(step.modules[1])
        self.changed.append(first)

    def install(self, root: nn.Module) -> None:
        """Put the new layers into ``root``; absorbed modules become ``nn.Identity``."""
        cleared = set(self.cleared)
        for name in dict.fromkeys(self.changed):
            if name not in cleared:
                set_module(root, name, to_module(self.get(name), root.get_submodule(name)))
        for name in cleared:
            set_module(root, name, nn.Identity())
