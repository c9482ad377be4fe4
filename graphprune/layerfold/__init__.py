"""LayerFold: fold BatchNorms and linear layer pairs into fewer, exact layers.

:mod:`~graphprune.layerfold.compose` (the math) and :mod:`~graphprune.layerfold.plan`
(the plan and report types) import no framework; the PyTorch pass
(``plan_fold``, ``apply_fold``, ``fold``) is imported on first use.
"""

from .compose import (
    ConvConfig,
    ConvLayer,
    FoldError,
    add_identity,
    affine_refusal,
    bn_affine,
    compose,
    compose_linear,
    compose_linear_chain,
    compose_refusal,
    composite_config,
    config_refusal,
    fold_affine,
    fold_bn,
    layer_macs,
    residual_refusal,
)
from .plan import FoldPlan, FoldReport, FoldStep

_TORCH = ("plan_fold", "apply_fold", "fold", "to_layer", "to_module")
_ONNX = ("plan_fold_onnx", "apply_fold_onnx", "fold_onnx", "onnx_depth")
_ONNX_BLOCKS = ("find_blocks_onnx", "block_report_onnx", "remove_blocks_onnx")

__all__ = [
    "ConvConfig", "ConvLayer", "FoldError", "add_identity", "affine_refusal", "bn_affine", "compose",
    "compose_linear", "compose_linear_chain", "compose_refusal", "composite_config", "config_refusal",
    "fold_affine", "fold_bn", "layer_macs", "residual_refusal", "FoldPlan", "FoldReport", "FoldStep",
    *_TORCH, *_ONNX, *_ONNX_BLOCKS,
]


def __getattr__(name: str):
    if name in _TORCH:
        from . import torch_fold

        return getattr(torch_fold, name)
    if name in _ONNX:
        from . import onnx_fold

        return getattr(onnx_fold, name)
    if name in _ONNX_BLOCKS:
        from . import onnx_blocks

        return getattr(onnx_blocks, name)
    raise AttributeError(f"module 'graphprune.layerfold' has no attribute '{name}'")
