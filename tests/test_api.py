"""The public API contract: plan JSON, ignore, round_to, reload, importance registry."""

import json

import pytest
import torch
import torchvision
from helpers import lively

import graphprune as gp


@pytest.fixture(scope="module")
def resnet():
    model = lively(torchvision.models.resnet18(weights=None))
    return model, torch.randn(1, 3, 64, 64)


def test_plan_json_round_trip_and_schema(resnet):
    model, x = resnet
    plan = gp.plan(model, x, ratio=0.5, ignore=[model.fc])
    data = json.loads(plan.to_json())
    g = data["groups"][0]
    assert g["kind"] == "channel"
    m = g["members"][0]
    assert {"name", "axis", "role", "keep"} <= set(m)
    assert m["role"] in ("out", "in")
    names = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(mm["name"] in names for gg in data["groups"] for mm in gg["members"])
    again = gp.PruningPlan.from_json(plan.to_json())
    assert again == plan


def test_state_dict_loads_into_fresh_model_of_pruned_shapes(resnet):
    model, x = resnet
    plan = gp.plan(model, x, ratio=0.5)
    slim = gp.apply(model, plan)
    fresh = gp.apply(torchvision.models.resnet18(weights=None), gp.PruningPlan.from_json(plan.to_json()))
    fresh.load_state_dict(slim.state_dict(), strict=True)
    fresh.eval()
    assert torch.allclose(fresh(x), slim(x))


def test_classifier_output_never_shrinks(resnet):
    model, x = resnet
    slim = gp.prune(model, x, ratio=0.6)
    assert slim.fc.out_features == 1000
    assert slim.fc.in_features < 512


def test_ignore_by_name_keeps_that_layer(resnet):
    model, x = resnet
    plan = gp.plan(model, x, ratio=0.5, ignore=["layer1.0.conv1"])
    slim = gp.apply(model, plan)
    assert slim.layer1[0].conv1.out_channels == 64
    assert slim.layer1[1].conv1.out_channels == 32


def test_round_to_and_never_empty(resnet):
    model, x = resnet
    slim = gp.prune(model, x, ratio=0.5, round_to=24)
    widths = [m.out_channels for m in slim.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 24 == 0 for w in widths if w not in (3,)), widths
    tiny = gp.prune(model, x, ratio=0.99)
    assert all(m.out_channels >= 1 for m in tiny.modules() if isinstance(m, torch.nn.Conv2d))


def test_importance_registry_and_custom_class(resnet):
    model, x = resnet
    assert {"l1", "l2", "random"} <= set(gp.list_importance())

    class Last(gp.Importance):
        def __call__(self, group, arrays):
            import numpy as np
            return np.arange(len(group.units), dtype=float)

    plan = gp.plan(model, x, ratio=0.5, importance=Last())
    slim = gp.apply(model, plan)
    gp.verify(model, slim, plan, x)
    kept = plan.groups[0].members[0].keep
    assert kept == tuple(sorted(kept)) and max(kept) == plan.groups[0].width - 1


def test_l1_and_l2_remove_the_weakest_channel():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 0.1, 2.0, 3.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
        model[2].weight.fill_(1.0)
    x = torch.randn(1, 3, 4, 4)
    for crit in ("l1", "l2"):
        plan = gp.plan(model, x, ratio=0.25, importance=crit)
        removed = [i for m in plan.groups[0].members if m.name == "0.weight" for i in m.removed]
        assert removed == [1]
