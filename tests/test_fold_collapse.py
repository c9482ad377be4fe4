"""Collapsed activations: EASIER entropy of sign states over data, TLC from
BatchNorm statistics, fx sites for functional calls, module hooks otherwise."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_untouched, snapshot

from graphprune.errors import InvalidArgumentError
from graphprune.layerfold.collapse import ActivationReport, activation_report, choose_linearise, tlc_score


class Tiny(nn.Module):
    """fc_mix -> act_mix (mixed), fc_id -> act_id (always positive), fc_zero -> act_zero (always negative)."""

    def __init__(self):
        super().__init__()
        self.fc_mix, self.act_mix = nn.Linear(8, 16), nn.ReLU()
        self.fc_id, self.act_id = nn.Linear(16, 16), nn.ReLU()
        self.fc_zero, self.act_zero = nn.Linear(16, 16), nn.LeakyReLU(0.1)
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            for fc, bias in ((self.fc_id, 100.0), (self.fc_zero, -1000.0)):
                fc.weight.uniform_(-0.01, 0.01)
                fc.bias.fill_(bias)

    def forward(self, x):
        return self.head(self.act_zero(self.fc_zero(self.act_id(self.fc_id(self.act_mix(self.fc_mix(x)))))))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it; the module sites remain."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)

    def forward(self, x):
        h = self.act(self.fc1(x))
        if h.sum() > 0:
            h = h * 2
        return self.fc2(F.relu(h))


def data(n=256, seed=0):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def test_identity_zero_and_mixed_are_told_apart_and_ranked():
    torch.manual_seed(0)
    model = Tiny().train()
    snap = snapshot(model)
    report = activation_report(model, data())
    assert_untouched(model, snap)
    assert model.training and all(m.training for m in model.modules())
    by = {e.name: e for e in report}
    assert set(by) == {"act_mix", "act_id", "act_zero"}
    assert by["act_id"].state == "identity" and by["act_id"].entropy == 0.0
    assert by["act_id"].positive_fraction == 1.0 and by["act_id"].slope == 1.0
    assert by["act_zero"].state == "zero" and by["act_zero"].entropy == 0.0
    assert by["act_zero"].positive_fraction == 0.0 and by["act_zero"].slope == pytest.approx(0.1)
    assert by["act_mix"].state == "mixed" and by["act_mix"].entropy > 0.5
    assert 0.2 < by["act_mix"].positive_fraction < 0.8
    assert report.names()[-1] == "act_mix"
    assert [e.entropy for e in report] == sorted(e.entropy for e in report)
    assert by["act_id"].before == "fc_id" and by["act_id"].after == "fc_zero"
    assert by["act_id"].channels == 16 and by["act_id"].identity_channels == 16 and by["act_id"].calls == 1
    assert set(choose_linearise(report, k=2)) == {"act_id", "act_zero"}
    assert set(choose_linearise(report, threshold=0.1)) == {"act_id", "act_zero"}
    assert choose_linearise(report, k=3)[-1] == "act_mix"
    assert choose_linearise(report, k=1, states=("identity",)) == ["act_id"]
    assert choose_linearise(report, threshold=1.0, states=["zero", "mixed"]) == ["act_zero", "act_mix"]


def test_entropy_is_the_mean_binary_entropy_per_channel():
    """Channel 0 is on for a quarter of the samples, channel 1 always: (H(1/4) + 0) / 2."""
    x = torch.tensor([[1.0, 1.0], [-1.0, 2.0], [-1.0, 3.0], [-2.0, 4.0]])
    report = activation_report(nn.Sequential(nn.ReLU()), x)
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert report[0].entropy == pytest.approx(h / 2, abs=1e-12)
    assert report[0].positive_fraction == pytest.approx(5 / 8)
    assert report[0].state == "mixed" and report[0].identity_channels == 1 and report[0].zero_channels == 0


def test_per_channel_on_off_is_masked():
    fc = nn.Linear(8, 16)
    with torch.no_grad():
        fc.weight.uniform_(-0.01, 0.01)
        fc.bias.copy_(torch.tensor([100.0, -100.0] * 8))
    entry = activation_report(nn.Sequential(fc, nn.ReLU()), data())["1"]
    assert entry.state == "masked" and entry.entropy == 0.0 and entry.slope is None
    assert (entry.identity_channels, entry.zero_channels, entry.channels) == (8, 8, 16)


def test_tlc_matches_hand_computed_value():
    """gamma = [1, 2, 0.5, -1], beta = [0, 1, -1, 2]: Phi(0), Phi(-0.5), Phi(-2), Phi(-2)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        model[1].bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    expected = (0.5 + 0.3085375387259869 + 2 * 0.022750131948179195) / 4
    report = activation_report(model)  # no data: TLC only
    entry = report["2"]
    assert report.score == "tlc" and entry.state == "unmeasured" and entry.entropy is None
    assert entry.tlc == pytest.approx(expected, abs=1e-12)
    assert entry.bn == "1" and entry.before == "0"
    assert tlc_score(model[1])[0] == pytest.approx(expected, abs=1e-12)
    assert choose_linearise(report, k=1, score="tlc") == ["2"]
    with_data = activation_report(model, torch.randn(2, 3, 8, 8))["2"]
    assert with_data.tlc == pytest.approx(expected, abs=1e-12) and with_data.entropy is not None


def test_functional_relu_is_found_by_fx():
    report = activation_report(Functional(), data())
    assert len(report) == 1
    entry = report[0]
    assert entry.kind == "relu" and entry.module is None and entry.node == "relu" and entry.name == "relu"
    assert entry.before == "fc1" and entry.after == "fc2" and entry.state == "mixed"


def test_shared_module_gives_one_site_per_call():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(8, 8), relu, nn.Linear(8, 8), relu)
    report = activation_report(model, data())
    assert len(report) == 2 and all(e.module == "1" and e.calls == 1 for e in report)
    assert len({e.name for e in report}) == 2 and {e.node for e in report} == set(report.names())


def test_untraceable_model_keeps_module_sites():
    report = activation_report(Untraceable(), data())
    assert report.names() == ["act"]
    assert report[0].node is None and report[0].kind == "gelu" and report[0].calls == 1


def test_dataloader_with_labels_and_max_batches():
    ds = torch.utils.data.TensorDataset(data(64), torch.randint(0, 4, (64,)))
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    report = activation_report(Tiny(), loader, max_batches=2)
    assert all(e.calls == 2 for e in report)


def test_report_round_trips_through_json():
    report = activation_report(Tiny(), data())
    again = ActivationReport.from_dict(json.loads(report.to_json()))
    assert again == report


def test_bad_arguments_are_typed_errors():
    report = activation_report(Tiny(), data())
    with pytest.raises(InvalidArgumentError, match="k or threshold"):
        choose_linearise(report)
    with pytest.raises(InvalidArgumentError, match="k=4"):
        choose_linearise(report, k=4)
    with pytest.raises(InvalidArgumentError, match="only 1 activation sites with a 'entropy' score in states"):
        choose_linearise(report, k=2, states=["identity"])
    with pytest.raises(InvalidArgumentError, match="states"):
        choose_linearise(report, k=1, states="identity")
    with pytest.raises(InvalidArgumentError, match="score"):
        choose_linearise(report, k=1, score="variance")
    with pytest.raises(InvalidArgumentError, match="no activation site named 'nope'"):
        report["nope"]
    with pytest.raises(InvalidArgumentError, match="does not fit"):
        activation_report(Untraceable(), torch.randn(4, 5))
    with pytest.raises(InvalidArgumentError, match="tol"):
        activation_report(Tiny(), data(), tol=0.7)
