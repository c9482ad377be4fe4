"""Criteria conformance (over the whole registry) and global allocation."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import graphprune as gp
from graphprune.calibration import Calibration, activation_statistics, gradient_statistics
from graphprune.scoring.importance import IMPORTANCE, REDUCTIONS, StatArrays
from graphprune.zoo import lively_init

BASELINES = {"random"}  # scores that ignore the weights by design
DEAD = 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def planted():
    torch.manual_seed(0)
    net = lively_init(Net().eval())
    with torch.no_grad():
        net.c1.weight[DEAD] = 0
        net.c1.bias[DEAD] = 0
        net.b1.weight[DEAD] = 0
        net.b1.bias[DEAD] = 0
        net.c2.weight[:, DEAD] = 0
    return net, torch.randn(2, 3, 8, 8)


def c1_group(net, x):
    coupling = gp.analyze(net, x, ignore=[net.fc])
    group = next(g for g in coupling.groups if any(m.param == "c1.weight" and m.role == "out" for m in g.members))
    arrays = {k: v.detach().numpy() for k, v in {**dict(net.named_parameters()), **dict(net.named_buffers())}.items()}
    return group, arrays


def dead_unit(group):
    member = next(m for m in group.members if m.param == "c1.weight" and m.role == "out")
    return group.units.index(member.units[member.indices.index(DEAD)])


@pytest.mark.parametrize("name", sorted(set(IMPORTANCE) - BASELINES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_criterion_ranks_a_dead_channel_last(name, reduction):
    net, x = planted()
    group, arrays = c1_group(net, x)
    criterion = IMPORTANCE[name](reduction=reduction)
    if criterion.statistic != "weight":
        data = Calibration([torch.randn(4, 3, 8, 8) for _ in range(2)])
        collect = gradient_statistics if criterion.statistic in ("taylor", "fisher") else activation_statistics
        arrays = StatArrays(collect(net, data, criterion.statistic), arrays)
    scores = criterion(group, arrays)
    assert scores.shape == (group.width,) and np.all(np.isfinite(scores))
    dead = dead_unit(group)
    assert scores[dead] == scores.min() and np.sum(scores == scores.min()) == 1


def test_registry_is_complete_and_baselines_are_reproducible():
    names = {"l1", "l2", "bn_scale", "fpgm", "taylor", "obd", "activation", "wanda", "random"}
    assert names <= set(gp.list_importance())
    net, x = planted()
    group, arrays = c1_group(net, x)
    rnd = IMPORTANCE["random"]
    assert np.array_equal(rnd(seed=1)(group, arrays), rnd(seed=1)(group, arrays))


def test_bad_reduction():
    with pytest.raises(gp.InvalidArgumentError, match="reduction"):
        IMPORTANCE["l2"](reduction="median")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return lively_init(torchvision.models.resnet18().eval()), torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("normalizer", ["mean", "lamp", "none"])
def test_global_allocation_meets_macs_budget_within_two_percent(resnet, normalizer):
    model, x = resnet
    plan = gp.plan(model, x, macs=0.5, ignore=[model.fc], allocation="global", normalizer=normalizer)
    slim = gp.apply(model, plan)
    kept = gp.count_macs(slim, x) / gp.count_macs(model, x)
    assert 0.48 <= kept <= 0.5
    gp.verify(model, slim, plan, x)


def test_global_ratio_respects_max_ratio_and_differs_from_local(resnet):
    model, x = resnet
    glob = gp.plan(model, x, ratio=0.5, ignore=[model.fc], allocation="global", max_ratio=0.7)
    local = gp.plan(model, x, ratio=0.5, ignore=[model.fc])
    assert all(g.kept_units >= 0.3 * g.width for g in glob.groups)
    total = sum(g.width for g in local.groups)
    removed = sum(g.width - g.kept_units for g in glob.groups)
    assert abs(removed - 0.5 * total) <= 1
    assert sorted(g.kept_units for g in glob.groups) != sorted(g.kept_units for g in local.groups)


@pytest.mark.parametrize("kw", [{"allocation": "everywhere"}, {"normalizer": "z"}, {"max_ratio": 1.0},
                                {"max_ratio": True}])
def test_bad_allocation_options(resnet, kw):
    model, x = resnet
    with pytest.raises(gp.InvalidArgumentError):
        gp.plan(model, x, **kw)


def test_reconstruction_error_is_the_least_squares_residual():
    """The first greedy removal costs exactly what an explicit least-squares
    refit of the other columns leaves (tiny ridge), and it is the cheapest unit."""
    from graphprune.scoring.reconstruction import greedy_errors

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((200, 12)), rng.standard_normal((5, 12))
    x[:, 7] = 0.8 * x[:, 2] + 0.05 * rng.standard_normal(200)   # column 7 is nearly explained by 2
    scores = greedy_errors(w, x.T @ x, [np.array([i]) for i in range(12)], [True] * 12, ridge=1e-10)

    def residual(j):
        keep = [i for i in range(12) if i != j]
        fit = np.linalg.lstsq(x[:, keep], x @ w.T, rcond=None)[0]
        return float(np.square(x @ w.T - x[:, keep] @ fit).sum())

    explicit = np.array([residual(j) for j in range(12)])
    first = int(np.argmin(scores))
    assert first == int(np.argmin(explicit)) and first in (2, 7)
    assert np.isclose(scores[first], explicit[first], rtol=1e-6)
    assert np.all(np.diff(np.sort(scores)) >= 0) and np.all(np.isfinite(scores))


class Duplicate(nn.Module):
    """Hidden channel 5 is an exact copy of channel 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        with torch.no_grad():
            self.a.weight[5], self.a.bias[5] = self.a.weight[0], self.a.bias[0]
            self.b.weight[:, [0, 5]] *= 4

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_reconstruction_removes_one_of_two_duplicates_and_compensation_makes_it_lossless():
    """With a small ridge (the default 0.1 trades some of this for robustness
    on held-out data) a copy costs nothing: its twin takes over its weights."""
    from graphprune.apply.compensate import compensate

    net, x = Duplicate().eval(), torch.randn(64, 4)
    cal = list(x.split(16))
    criterion = IMPORTANCE["reconstruction"](ridge=1e-4)
    plan = gp.plan(net, x[:2], ratio=1 / 6, importance=criterion, calibration=cal)
    removed = {i for g in plan.groups for m in g.members if m.name == "a.weight" for i in m.removed}
    assert len(removed) == 1 and removed <= {0, 5}
    l2 = gp.plan(net, x[:2], ratio=1 / 6, importance="l2")
    assert not {i for g in l2.groups for m in g.members if m.name == "a.weight" for i in m.removed} & {0, 5}
    with torch.no_grad():
        ref = net(x)
        plain = float((gp.apply(net, plan)(x) - ref).norm())
        slim = gp.apply(net, plan)
        compensate(net, slim, plan, Calibration(cal), ridge=1e-4)
        fixed = float((slim(x) - ref).norm())
    assert fixed < 1e-2 * plain   # the kept copy takes over (up to the ridge)
    with pytest.raises(gp.InvalidArgumentError, match="ridge"):
        IMPORTANCE["reconstruction"](ridge=0)


def test_default_allocation_is_global_only_for_comparable_scores_of_every_group(monkeypatch):
    """Reconstruction errors are one unit everywhere: by default they are
    ranked globally without a normaliser (and still meet a MACs budget);
    magnitude scores, an explicit choice, or a group the criterion could not
    score itself (L2 fallback) keep one ratio per group."""
    torch.manual_seed(0)
    net, x = lively_init(Net().eval()), torch.randn(1, 3, 8, 8)
    cal = [torch.randn(8, 3, 8, 8)]
    plan = gp.plan(net, x, macs=0.5, calibration=cal)
    assert (plan.meta["importance"], plan.meta["allocation"], plan.meta["normalizer"]) == (
        "reconstruction", "global", "none")
    kept = gp.count_macs(gp.apply(net, plan), x) / gp.count_macs(net, x)
    assert 0.4 <= kept <= 0.5  # 16 channels: one is several % of the MACs (ResNet: within 2%, above)
    assert gp.plan(net, x, ratio=0.3).meta["allocation"] == "local"
    assert gp.plan(net, x, ratio=0.3, calibration=cal, allocation="local").meta["allocation"] == "local"
    assert gp.plan(net, x, ratio=0.3, allocation="global").meta["normalizer"] == "mean"
    monkeypatch.setattr("graphprune.calibration.MAX_GRAM_DIM", 16)  # c2 (72 inputs) gets no Gram matrix
    fallback = gp.plan(net, x, ratio=0.25, calibration=cal)
    assert (fallback.meta["importance"], fallback.meta["allocation"]) == ("reconstruction", "local")
