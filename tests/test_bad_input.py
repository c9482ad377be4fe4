"""Bad input: one-line typed errors, and the user's model is bit-identical afterwards."""

import pytest
import torch
import torch.nn as nn
from helpers import assert_untouched, snapshot

import graphprune as gp


class DataDependent(nn.Module):
    """fx cannot trace the branch; torch.export cannot decide it either."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y * 2
        return y


class ShapeBranch(nn.Module):
    """fx cannot trace a branch on a shape; torch.export can."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = x * 1.0
        return self.b(torch.relu(self.a(x)))


class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))


def one_line(err):
    return "\n" not in str(err.value) and str(err.value)


def test_untraceable_model_names_both_failures():
    model = DataDependent().train()
    snap = snapshot(model)
    with pytest.raises(gp.CaptureError) as err:
        gp.plan(model, torch.randn(1, 3, 8, 8))
    assert one_line(err) and "torch.fx failed" in str(err.value) and "torch.export failed" in str(err.value)
    assert "recording failed" in str(err.value) and "computed from weights" in str(err.value)
    assert_untouched(model, snap)
    assert model.training and model.bn.training


def test_fallback_captures_what_fx_cannot():
    model = ShapeBranch().eval()
    x = torch.randn(1, 3, 8, 8)
    plan = gp.plan(model, x, ratio=0.5)
    assert plan.meta["capture"] == "record"  # one eager forward; torch.export is the last resort
    slim = gp.apply(model, plan)
    assert slim.a.out_channels == 4
    gp.verify(model, slim, plan, x)


def test_unknown_op_under_strict_names_op_and_node():
    model = Mystery()
    snap = snapshot(model)
    with pytest.raises(gp.UnsupportedOpError) as err:
        gp.plan(model, torch.randn(1, 3, 8, 8), strict=True)
    assert one_line(err) and "cumsum" in str(err.value) and "node 'cumsum'" in str(err.value)
    assert_untouched(model, snap)
    plan = gp.plan(model, torch.randn(1, 3, 8, 8))  # not strict: a barrier, reported
    assert any("cumsum" in b for b in plan.meta["barriers"])
    assert not plan.groups  # the only prunable space sits behind the barrier


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "half", True])  # None means the default (0.5)
def test_ratio_outside_range(ratio):
    model = Mystery()
    snap = snapshot(model)
    with pytest.raises(gp.InvalidArgumentError) as err:
        gp.plan(model, torch.randn(1, 3, 8, 8), ratio=ratio)
    assert one_line(err) and "ratio" in str(err.value)
    assert_untouched(model, snap)


@pytest.mark.parametrize("ignore", ["nope", ["a", "b.missing"], [nn.Conv2d(1, 1, 1)], [42]])
def test_ignore_that_does_not_exist(ignore):
    model = Mystery()
    snap = snapshot(model)
    with pytest.raises(gp.InvalidArgumentError) as err:
        gp.plan(model, torch.randn(1, 3, 8, 8), ignore=ignore)
    assert one_line(err) and "ignore" in str(err.value)
    assert_untouched(model, snap)


def test_plan_that_does_not_fit():
    model = Mystery()
    other = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    plan = gp.plan(other, torch.randn(1, 3, 8, 8), ratio=0.5)
    snap = snapshot(model)
    with pytest.raises(gp.PlanError) as err:
        gp.apply(model, plan, inplace=True)
    assert one_line(err)
    assert_untouched(model, snap)


def test_bad_json_plan():
    with pytest.raises(gp.PlanError):
        gp.PruningPlan.from_json('{"groups": [{"id": 1}]}')


def test_not_a_module():
    with pytest.raises(gp.InvalidArgumentError, match="model"):
        gp.plan("resnet", torch.randn(1, 3, 8, 8))


def test_verify_on_meta_says_so_in_one_line():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.zeros(2, 4, device="meta")
    plan = gp.plan(model, x, ratio=0.5, importance="random")
    slim = gp.apply(model, plan)
    with pytest.raises(gp.InvalidArgumentError, match="meta device") as err:
        gp.verify(model, slim, plan, x)
    assert one_line(err)
