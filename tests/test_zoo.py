"""Every torchvision classification model: prune 50% of channels, exactly.

For each model (classifier ignored): the pruned model runs, keeps its output
shape, keeps at most 60% of the MACs, passes the oracle (exact for every
group outside LayerNorm coupling, lossy ones reported), and the model passed
in is bit-identical afterwards.  The heaviest models are marked slow; they run
in ``benchmarks/zoo.py`` and with ``pytest -m slow``.
"""

import pytest
import torch
import torchvision
from helpers import assert_untouched, snapshot

import graphprune as gp
from graphprune.zoo import build, classifier, lively_init

ALL = torchvision.models.list_models(module=torchvision.models)
SLOW = {  # over ~200M params or 20 GMACs: minutes each on 2 cores, gigabytes per copy
    "vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf",
    "efficientnet_v2_l", "efficientnet_b7", "convnext_large",
}


def params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def test_zoo_is_complete():
    assert len(ALL) >= 80


@pytest.mark.parametrize("name", params(ALL))
def test_prune_half_the_channels(name):
    torch.manual_seed(0)
    model, x = build(f"torchvision:{name}", small=True)
    lively_init(model)
    snap = snapshot(model)
    head = classifier(model)
    plan = gp.plan(model, x, ratio=0.5, ignore=[head] if head is not None else None)
    slim = gp.apply(model, plan)
    assert_untouched(model, snap)
    with torch.no_grad():
        assert slim(x).shape == model(x).shape
    kept = gp.count_macs(slim, x) / gp.count_macs(model, x)
    assert kept <= 0.60, f"only {1 - kept:.0%} of MACs removed"
    report = gp.verify(model, slim, plan, x)
    assert report.exact_groups > 0
    assert report.max_abs_diff <= report.tolerance
    assert set(report.lossy_groups) == set(plan.lossy_groups)


@pytest.mark.parametrize("name", params(ALL))
def test_batchnorm_folding_is_exact(name):
    """gp.fold with BN folding only (no residual folds): every BatchNorm next to
    a conv/linear is folded, the rest are refused with a reason, the folded
    model matches the original (fold verifies itself and raises otherwise),
    and the model passed in is bit-identical afterwards."""
    torch.manual_seed(0)
    model, x = build(f"torchvision:{name}", small=True)
    lively_init(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        pytest.skip("no BatchNorm")
    snap = snapshot(model)
    folded, report = gp.fold(model, x, residual=False)
    assert_untouched(model, snap)
    assert report.max_abs_diff <= report.tolerance
    n_bn = sum(1 for s in report.plan.folds if s.kind.startswith("bn"))
    left = [m for m in folded.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert n_bn >= 1 and len(left) == len(bns) - n_bn
    assert all(s.reason for s in report.refused)
    assert report.macs_after <= report.macs_before
