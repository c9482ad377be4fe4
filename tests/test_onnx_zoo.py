"""torchvision classifiers exported with both of torch's ONNX exporters
(TorchScript with a dynamic batch axis; dynamo), pruned as ONNX files.

For each: 50% of every group's channels removed, the slim file passes
``onnx.checker.check_model(full_check=True)``, runs in onnxruntime with the
original output shape, keeps at most 60% of the MACs, and satisfies the
oracle (exact for every group outside LayerNorm coupling, lossy ones
reported).  The exported file on disk is bit-identical afterwards.
"""

import contextlib
import hashlib
import io
import warnings

import onnx
import pytest
import torch

import graphprune as gp
from graphprune.verify.onnx_verify import run_onnx
from graphprune.zoo import build, lively_init

MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "densenet121", "googlenet",
    "inception_v3", "shufflenet_v2_x1_0", "squeezenet1_1", "mnasnet0_5", "regnet_x_400mf",
    "regnet_y_400mf", "convnext_tiny", "resnet34", "mnasnet1_0", "vit_b_32",
]


def export(name: str, dynamo: bool, path: str):
    torch.manual_seed(0)
    model, x = build(f"torchvision:{name}", small=True)
    lively_init(model)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=["x"], output_names=["y"])
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                              opset_version=17, dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return x.numpy()


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", MODELS)
def test_prune_exported_onnx(name, exporter, tmp_path):
    path = str(tmp_path / f"{name}.onnx")
    x = {"x": export(name, exporter == "dynamo", path)}
    before = digest(path)
    plan = gp.plan_onnx(path, ratio=0.5, inputs=x)
    slim = gp.apply_onnx(path, plan, inputs=x)
    assert digest(path) == before
    onnx.checker.check_model(slim, full_check=True)
    original = onnx.load(path)
    assert [o.shape for o in run_onnx(slim, x)] == [o.shape for o in run_onnx(original, x)]
    kept = gp.count_macs_onnx(slim, x) / gp.count_macs_onnx(original, x)
    assert kept <= 0.60, f"only {1 - kept:.0%} of MACs removed"
    report = gp.verify_onnx(original, slim, plan, x)
    assert report.exact_groups > 0
    assert report.max_abs_diff <= report.tolerance
    assert set(report.lossy_groups) == set(plan.lossy_groups)
