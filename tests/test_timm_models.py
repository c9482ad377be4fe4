"""timm families beyond attention: ConvNeXt (depthwise conv, channels-last
LayerNorm, layer scale), MLP-Mixer (token- and channel-mixing MLPs) and
ResMLP (``Affine`` = ``torch.addcmul``).  Channels are pruned by half; the
oracle is exact on every group that does not cross LayerNorm statistics, and
those are reported lossy, never passed as exact."""

import pytest
import timm
import torch
from helpers import assert_untouched, lively, snapshot
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

import graphprune as gp


def convnext():
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10)


def mixer():
    return MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=2, embed_dim=64)


def resmlp():
    return MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=2, embed_dim=64, mlp_ratio=4,
                    block_layer=ResBlock, norm_layer=Affine)


@pytest.mark.parametrize("build,max_macs,layer_norm", [(convnext, 0.35, True), (mixer, 0.45, True),
                                                       (resmlp, 0.45, False)], ids=["convnext", "mixer", "resmlp"])
def test_timm_family_pruned_exactly_or_reported_lossy(build, max_macs, layer_norm):
    model = lively(build())
    x = torch.randn(2, 3, 64, 64)
    snap = snapshot(model)
    plan = gp.plan(model, x, ratio=0.5, ignore=[model.get_classifier()], strict=True)
    slim = gp.apply(model, plan)
    assert slim(x).shape == (2, 10)
    assert gp.count_macs(slim, x) <= max_macs * gp.count_macs(model, x)
    report = gp.verify(model, slim, plan, x)
    assert report.max_abs_diff <= report.tolerance
    assert bool(report.lossy_groups) == layer_norm  # only LayerNorm statistics make a group lossy
    assert_untouched(model, snap)
