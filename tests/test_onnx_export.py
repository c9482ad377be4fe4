"""export_onnx: BatchNorm folded (exact), dynamic batch axis, parity with PyTorch."""

import onnx
import pytest
import torch
import torchvision
from helpers import assert_untouched, snapshot

import graphprune as gp
from graphprune.verify.onnx_verify import run_onnx
from graphprune.zoo import lively_init


def test_export_pruned_resnet(tmp_path):
    torch.manual_seed(0)
    model = lively_init(torchvision.models.resnet18().eval())
    x = torch.randn(2, 3, 64, 64)
    slim = gp.prune(model, x, ratio=0.5, ignore=[model.fc])
    snap = snapshot(slim)
    path = tmp_path / "slim.onnx"
    info = gp.export_onnx(slim, x, str(path))
    assert_untouched(slim, snap)
    assert info["folded_batchnorms"] == 20 and info["max_abs_diff"] <= info["tolerance"]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    x5 = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        expected = slim(x5).numpy()
    got = run_onnx(proto, {proto.graph.input[0].name: x5.numpy()})[0]
    assert abs(got - expected).max() <= 1e-4 * abs(expected).max()


def test_fold_batchnorm_is_exact_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = lively_init(torchvision.models.mobilenet_v2().eval())
    snap = snapshot(model)
    folded, n = gp.fold_batchnorm(model)
    assert_untouched(model, snap)
    assert n == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_export_failure_writes_nothing(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.qr(x)[0]  # no ONNX symbolic

    path = tmp_path / "bad.onnx"
    with pytest.raises(gp.GraphPruneError):
        gp.export_onnx(Bad(), torch.randn(1, 3, 8, 8), str(path))
    assert not path.exists() and not (tmp_path / "bad.onnx.partial").exists()
