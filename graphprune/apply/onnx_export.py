"""Export a (pruned) PyTorch model to ONNX, checked against PyTorch.

BatchNorm layers that directly follow a conv are folded into it first
(``torch.nn.utils.fusion.fuse_conv_bn_eval``: exact in eval mode).  The
TorchScript exporter is tried first (fast, dynamic batch axis), then the
``dynamo=True`` exporter.  At the end the written file is run in
onnxruntime on the example inputs and compared with PyTorch; a mismatch
raises :class:`VerificationError` and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..atomic import atomic_path
from ..capture.onnx_load import graph_inputs
from ..capture.torch_fx import as_args
from ..errors import CaptureError, VerificationError
from ..verify.oracle import max_diff, scale_of
from ..verify.torch_verify import run


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` (eval) with every conv -> BN pair fused; returns the count.

    Only pairs where the BN is the conv's sole reader are folded; models fx
    cannot trace are returned unfused.
    """
    model = copy.deepcopy(model).eval()
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return model, 0
    mods = dict(model.named_modules())
    folded = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        conv = mods.get(src.target) if getattr(src, "op", None) == "call_module" else None
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or len(src.users) != 1:
            continue
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == src.target) != 1:
            continue  # the conv module is called twice: folding would change the other call
        _set(model, src.target, fuse_conv_bn_eval(conv, mods[node.target]))
        _set(model, node.target, nn.Identity())
        folded += 1
    return model, folded


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _export(model, args, path, names, dynamic_batch, opset) -> None:
    axes = {n: {0: "batch"} for n in names[0] + names[1]} if dynamic_batch else None
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                kw = {"dynamic_axes": axes, "opset_version": opset} if not dynamo else {}
                torch.onnx.export(model, args, path, dynamo=dynamo, input_names=names[0],
                                  output_names=names[1], **kw)
            return
        except Exception as err:
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(err).__name__}: {str(err)[:150]}")
    raise CaptureError(f"cannot export {type(model).__name__} to ONNX ({'; '.join(errors)})")


def export_onnx(model: nn.Module, example_inputs, path: str, dynamic_batch: bool = True,
                fold_bn: bool = True, opset: int = 17, rtol: float = 1e-4) -> dict:
    """Write ``model`` to ``path`` as ONNX and prove onnxruntime agrees with PyTorch.

    Returns ``{"path", "folded_batchnorms", "max_abs_diff", "tolerance"}``.
    The model passed in is not modified.
    """
    from ..verify.onnx_verify import run_onnx

    args, kwargs = as_args(example_inputs)
    if kwargs:
        raise CaptureError("export_onnx takes positional example inputs (a tensor or a tuple of tensors)")
    slim, folded = fold_batchnorm(model) if fold_bn else (copy.deepcopy(model).eval(), 0)
    try:
        expected = run(model, example_inputs)
    except Exception as err:
        raise CaptureError(f"{type(model).__name__} does not run on the example inputs: "
                           f"{type(err).__name__}: {str(err).strip()[:150]}") from err
    names = ([f"input{i}" if len(args) > 1 else "input" for i in range(len(args))],
             [f"output{i}" if len(expected) > 1 else "output" for i in range(len(expected))])
    with atomic_path(path) as tmp:
        _export(slim, args, tmp, names, dynamic_batch, opset)
        proto = onnx.load(tmp)
        feeds = {v.name: a.detach().cpu().numpy() for v, a in zip(graph_inputs(proto), args)}
        got = run_onnx(proto, feeds)
        diff = max_diff([e.astype(np.float64) for e in expected], got)
        tol = rtol * scale_of(expected) + 1e-6
        if not diff <= tol:
            raise VerificationError(f"ONNX export of {type(model).__name__} differs from PyTorch by {diff:.3g} "
                                    f"(tolerance {tol:.3g})")
    return {"path": path, "folded_batchnorms": folded, "max_abs_diff": diff, "tolerance": tol}
