"""The PyTorch fold pass: plan, apply, verify, on tiny models and torchvision CNNs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_untouched, lively, snapshot
from torch import nn

import graphprune.layerfold.torch_layers as torch_layers
from graphprune.errors import CaptureError, InvalidArgumentError, PlanError, VerificationError
from graphprune.layerfold import FoldPlan, apply_fold, fold, plan_fold


def x_img(c=4, size=12, seed=0):
    return torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(seed))


def count(model, cls):
    return sum(1 for m in model.modules() if type(m) is cls)


def by_kind(plan, kind, status=None):
    return [s for s in plan.steps if s.kind == kind and (status is None or s.status == status)]


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class BNFirst(nn.Module):
    def __init__(self, padding):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=padding, groups=2)

    def forward(self, x):
        return self.conv(self.bn(x))


class MLP(nn.Module):
    def __init__(self, norm=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 5), nn.Linear(5, 3)
        self.drop = nn.Dropout(0.5)
        self.mid = nn.BatchNorm1d(16) if norm else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.drop(self.mid(self.fc1(x))))))


class PointThenSpatial(nn.Module):
    def __init__(self, bias, functional=False):
        super().__init__()
        self.functional = functional
        self.conv1, self.act = nn.Conv2d(4, 8, 1, bias=bias), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x):
        h = self.conv1(x)
        return self.conv2(F.relu(h) if self.functional else self.act(h))


class Residual(nn.Module):
    """x + conv2(relu(conv1(x))), then a head: folds to one conv (W + I) and then the head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu = nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(x + self.conv2(self.relu(self.conv1(x))))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn2(self.conv(x))


def check_close(a, b, x, rtol=1e-5):
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    assert ya.shape == yb.shape
    assert (ya - yb).abs().max() <= rtol * ya.abs().max() + 1e-6


# -- BatchNorm ---------------------------------------------------------------------------------------------

def test_bn_folds_into_conv_keeps_class_and_leaves_the_model_untouched():
    model = lively(ConvBN()).train()
    snap = snapshot(model)
    folded, report = fold(model, x_img())
    assert_untouched(model, snap)
    assert model.training and not folded.training
    assert type(folded) is ConvBN and count(folded, nn.BatchNorm2d) == 0
    assert len(by_kind(report.plan, "bn", "exact")) == 2 and not report.refused
    assert report.depth_before == report.depth_after == 2
    assert report.macs_before == report.macs_after > 0
    assert report.max_abs_diff <= report.tolerance
    check_close(model, folded, x_img())


def test_bn_before_unpadded_conv_folds_and_padded_one_is_refused():
    exact = plan_fold(lively(BNFirst(padding=0)), x_img())
    assert [(s.where, s.status) for s in exact.steps] == [("before", "exact")]
    model = lively(BNFirst(padding=0))
    check_close(model, apply_fold(model, exact), x_img())
    refused = plan_fold(lively(BNFirst(padding=1)), x_img())
    assert refused.refused and "padding" in refused.refused[0].reason and not refused.folds
    forced = plan_fold(lively(BNFirst(padding=1)), x_img(), force=True)
    assert forced.steps[0].status == "forced"


def test_bn_with_batch_statistics_is_refused():
    model = ConvBN()
    model.bn1 = nn.BatchNorm2d(8, track_running_stats=False)
    plan = plan_fold(model, x_img())
    assert any("batch statistics" in s.reason for s in plan.refused)


def test_module_called_twice_is_not_folded():
    plan = plan_fold(lively(SharedConv()), x_img())
    assert not plan.folds and all("used 2 times" in s.reason for s in plan.refused)


# -- adjacent pairs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", [False, True])
def test_adjacent_linears_fold_through_identity_dropout_and_norm(norm):
    model = lively(MLP(norm=norm))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    folded, report = fold(model, x)
    assert type(folded) is MLP
    assert [s.modules for s in by_kind(report.plan, "linear_pair", "exact")] == [("fc1", "fc2")]
    assert report.depth_before == 3 and report.depth_after == 2
    assert report.macs_after < report.macs_before
    assert isinstance(folded.fc2, nn.Identity) and folded.fc1.weight.shape == (5, 6)
    check_close(model, folded, x)


def test_linearised_mlp_folds_to_one_linear():
    model = lively(MLP())
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    folded, report = fold(model, x, linearise=["act"])
    assert [s.modules for s in report.plan.folds] == [("fc1", "fc2"), ("fc1", "fc3")]
    assert report.depth_after == 1 and folded.fc1.weight.shape == (3, 6)
    with torch.no_grad():
        assert torch.allclose(folded(x), model.fc3(model.fc2(model.fc1(x))), atol=1e-5)
    assert "linear_pair fc1 + fc3: exact" in report.details()


def test_linearise_refuses_layers_and_multi_input_nodes():
    with pytest.raises(InvalidArgumentError, match="only one-input activations"):
        plan_fold(MLP(), torch.randn(2, 6), linearise=["fc2"])
    with pytest.raises(InvalidArgumentError, match="only one-input activations"):
        plan_fold(Residual(), x_img(), linearise=["add"])


def test_plan_is_rechecked_on_the_values_when_applied():
    plan = plan_fold(PointThenSpatial(bias=False), x_img(), linearise=["act"])
    assert [s.status for s in plan.steps] == ["exact"]
    with pytest.raises(PlanError, match="bias"):  # the same plan on a conv1 with a bias is not exact
        apply_fold(PointThenSpatial(bias=True), plan)


def test_linearised_module_lets_pointwise_then_3x3_fold():
    model = lively(PointThenSpatial(bias=False))
    x = x_img()
    folded, report = fold(model, x, linearise=["act"])
    assert type(folded) is PointThenSpatial and isinstance(folded.act, nn.Identity)
    assert report.plan.linearised_modules == ("act",) and report.depth_after == 1
    assert folded.conv1.kernel_size == (3, 3) and folded.conv1.padding == (1, 1)
    model.act = nn.Identity()
    check_close(model, folded, x)


def test_padding_that_cannot_move_is_refused_with_a_reason():
    plan = plan_fold(PointThenSpatial(bias=True), x_img(), linearise=["act"])
    (step,) = plan.refused
    assert step.kind == "conv_pair" and step.modules == ("conv1", "conv2")
    assert step.reason.startswith("padding of the intermediate map cannot move to the input")
    assert "bias" in step.reason


def test_force_folds_anyway_and_reports_the_border_error():
    model = lively(PointThenSpatial(bias=True))
    folded, report = fold(model, x_img(), linearise=["act"], force=True)
    assert [s.status for s in report.plan.steps] == ["forced"]
    assert report.forced_max_abs_diff > 1e-4 and report.max_abs_diff <= report.tolerance
    assert "forced" in str(report)


def test_functional_activation_needs_a_graph_module():
    model = lively(PointThenSpatial(bias=False, functional=True))
    x = x_img()
    plan = plan_fold(model, x, linearise=["relu"])
    assert plan.graph_module and plan.linearised_nodes == ("relu",)
    folded, report = fold(model, x, linearise=["relu"])
    assert isinstance(folded, torch.fx.GraphModule) and report.depth_after == 1
    assert "GraphModule" in str(report)
    assert not any(n.op == "call_function" and n.target is F.relu for n in folded.graph.nodes)
    with torch.no_grad():
        want = model.conv2(model.conv1(x))
    assert torch.allclose(folded(x), want, atol=1e-5)


def test_costlier_fold_is_refused_unless_asked():
    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.squeeze, self.expand = nn.Conv2d(32, 2, 3), nn.Conv2d(2, 32, 3)

        def forward(self, x):
            return self.expand(self.squeeze(x))

    x = x_img(32)
    (step,) = plan_fold(Bottleneck(), x).steps
    assert step.status == "refused" and "costs more" in step.reason and step.macs_after > step.macs_before
    folded, report = fold(Bottleneck(), x, only_if_cheaper=False)
    assert report.depth_after == 1 and report.macs_after > report.macs_before


# -- residual ---------------------------------------------------------------------------------------------

def test_residual_block_folds_to_one_conv_plus_identity():
    model = lively(Residual())
    x = x_img()
    folded, report = fold(model, x, linearise=["relu"])
    kinds = [(s.kind, s.status) for s in report.plan.steps]
    assert kinds == [("conv_pair", "exact"), ("residual", "exact"), ("conv_pair", "exact")]
    assert isinstance(folded, torch.fx.GraphModule) and report.depth_before == 3 and report.depth_after == 1
    assert not any(n.op == "call_function" for n in folded.graph.nodes)
    with torch.no_grad():
        want = model.head(x + model.conv2(model.conv1(x)))
    assert torch.allclose(folded(x), want, atol=1e-5)


class StemAndBlock(nn.Module):
    """p = stem(x); p + conv2(relu(conv1(p))): the stem folds only once the residual is gone."""

    def __init__(self, stem_bias):
        super().__init__()
        self.stem, self.conv1 = nn.Conv2d(3, 4, 1, bias=stem_bias), nn.Conv2d(4, 8, 3, padding=1)
        self.relu, self.conv2 = nn.ReLU(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        p = self.stem(x)
        out = self.conv2(self.relu(self.conv1(p)))
        out += p
        return out


@pytest.mark.parametrize("stem_bias", [False, True])
def test_folds_repeat_until_nothing_changes(stem_bias):
    model = lively(StemAndBlock(stem_bias))
    x = x_img(3)
    folded, report = fold(model, x, linearise=["relu"])
    steps = [(s.kind, s.modules, s.status) for s in report.plan.steps]
    assert steps[:2] == [("conv_pair", ("conv1", "conv2"), "exact"), ("residual", ("conv1",), "exact")]
    assert steps[2] == ("conv_pair", ("stem", "conv1"), "refused" if stem_bias else "exact")
    assert report.depth_after == (2 if stem_bias else 1)
    with torch.no_grad():
        p = model.stem(x)
        assert torch.allclose(folded(x), p + model.conv2(model.conv1(p)), atol=1e-5)


class PlainResidual(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return x + self.layer(x)


@pytest.mark.parametrize("layer, x", [
    (nn.Conv2d(4, 4, 3, padding="same", groups=2), x_img()),
    (nn.Conv2d(4, 4, 3, padding="same", dilation=2), x_img()),
    (nn.Linear(6, 6), torch.randn(3, 5, 6)),
])
def test_plain_residual_becomes_w_plus_identity(layer, x):
    model = PlainResidual(layer)
    folded, report = fold(model, x)
    assert [(s.kind, s.status) for s in report.plan.steps] == [("residual", "exact")]
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert not any(n.op == "call_function" for n in folded.graph.nodes)


def test_residual_can_be_turned_off():
    plan = plan_fold(Residual(), x_img(), linearise=["relu"], residual=False)
    assert not by_kind(plan, "residual") and not plan.graph_module
    assert [s.modules for s in plan.folds] == [("conv1", "conv2")]


# -- plan object, errors, verification ---------------------------------------------------------------------

def test_plan_round_trips_through_json_and_applies_the_same():
    model = lively(Residual())
    plan = plan_fold(model, x_img(), linearise=["relu"])
    again = FoldPlan.from_json(plan.to_json(indent=2))
    assert again == plan
    x = x_img()
    assert torch.equal(apply_fold(model, plan)(x), apply_fold(model, again)(x))


def test_plan_for_another_model_is_a_plan_error():
    plan = plan_fold(lively(ConvBN()), x_img())
    with pytest.raises(PlanError, match="conv1"):
        apply_fold(MLP(), plan)
    with pytest.raises(PlanError, match="not a graphprune fold plan"):
        FoldPlan.from_json('{"steps": [{"kind": "bn"}]}')


def test_bad_linearise_name_and_untraceable_model_are_typed_errors():
    with pytest.raises(InvalidArgumentError, match="nothing"):
        plan_fold(ConvBN(), x_img(), linearise=["nope"])

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(CaptureError, match="torch.fx"):
        plan_fold(Branchy(), x_img())


def test_wrong_fold_math_fails_verification(monkeypatch):
    monkeypatch.setattr(torch_layers, "add_identity", lambda layer: layer)  # drop the identity of W + I
    with pytest.raises(VerificationError, match="differs"):
        fold(lively(Residual()), x_img(), linearise=["relu"])


# -- torchvision -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0", "regnet_x_400mf",
                                  "convnext_tiny"])
def test_bn_folding_is_exact_on_torchvision(name):
    pytest.importorskip("torchvision")
    from graphprune.zoo import build

    model, x = build(f"torchvision:{name}", small=True)
    norms = sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    if not norms:
        pytest.skip(f"{name} has no BatchNorm")
    lively(model)
    snap = snapshot(model)
    folded, report = fold(model, x)  # raises VerificationError if not exact
    assert_untouched(model, snap)
    folded_bns = len(by_kind(report.plan, "bn", "exact"))
    assert folded_bns > 0 and count(folded, nn.BatchNorm2d) == norms - folded_bns
    assert type(folded) is type(model) and report.depth_after == report.depth_before
    assert all(s.reason for s in report.refused)
