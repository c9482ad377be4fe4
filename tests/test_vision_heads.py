"""Whole attention heads of vision transformers (timm and torchvision).

timm ``Attention`` / ``WindowAttention`` and torchvision
``nn.MultiheadAttention`` / ``ShiftedWindowAttention`` are captured as one
``mha`` op each; a head group holds the head's q, k, v rows, its projection
columns and (Swin) its column of the relative position bias table.  For each
model, 25% and 50% of the heads (and of the MLP channels) go: the pruned
model runs with the same output shape, the oracle is exact for every head and
MLP group (lossy groups only where LayerNorm statistics are crossed), head
counts are rewritten, and the model passed in is bit-identical afterwards.
"""

import copy
import io

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from helpers import assert_untouched, lively, snapshot

import graphprune as gp
from graphprune.apply.attention_modules import HeadPrunedMultiheadAttention, window_attention_class
from graphprune.apply.torch_apply import rewrite_head_counts


def timm_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=4, num_classes=10), 32


def timm_deit():
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=4, num_classes=10), 32


def timm_vit_unfused():  # the explicit softmax(q k^T) path of timm's Attention
    model, size = timm_vit()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model, size


def timm_swin():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, patch_size=4,
                             window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10), 64


def tv_vit():
    return torchvision.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10), 32


def tv_swin():
    return torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10), 64


MODELS = [timm_vit, timm_deit, timm_vit_unfused, timm_swin, tv_vit, tv_swin]


def build(fn):
    model, size = fn()
    return lively(model), torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def owner(name):
    """Attention module path of a head-group member (``...attn.qkv.weight``, ``...in_proj_weight``)."""
    parts = name.split(".")
    return ".".join(parts[:-2] if parts[-2] in ("qkv", "proj", "out_proj") else parts[:-1])


def is_layer_norm_stream(model, group):
    mods = dict(model.named_modules())
    return any(isinstance(mods.get(m.name.rpartition(".")[0]), nn.LayerNorm) for m in group.members)


@pytest.mark.parametrize("share", [0.25, 0.5])
@pytest.mark.parametrize("make", MODELS)
def test_heads_are_pruned_whole_and_exactly(make, share):
    model, x = build(make)
    snap = snapshot(model)
    before = rewrite_head_counts(copy.deepcopy(model))
    plan = gp.plan(model, x, ratio=share, heads=share)
    slim = gp.apply(model, plan)
    assert_untouched(model, snap)
    with torch.no_grad():
        assert slim(x).shape == model(x).shape
    heads = [g for g in plan.groups if g.kind == "head"]
    assert heads and all(g.kept_units == g.width - int(share * g.width) for g in heads)
    assert not any(g.lossy for g in heads)
    mlp = [g for g in plan.groups if any(m.role == "out" and (".fc1." in m.name or ".mlp.0." in m.name)
                                         for m in g.members)]
    assert mlp and not any(g.lossy for g in mlp)
    assert all(is_layer_norm_stream(model, g) for g in plan.groups if g.lossy)
    report = gp.verify(model, slim, plan, x)
    assert report.max_abs_diff <= report.tolerance
    assert set(report.lossy_groups) == set(plan.lossy_groups)
    after = rewrite_head_counts(slim)
    n_attn = sum(1 for m in model.modules() if hasattr(m, "qkv") or isinstance(m, nn.MultiheadAttention))
    assert after.keys() == before.keys() and len(after) == n_attn
    kept = {owner(g.members[0].name): g.kept_units for g in heads}
    mods = dict(slim.named_modules())
    for name, (h, _) in after.items():
        assert h == kept.get(name, before[name][0]) == mods[name].num_heads
        table = getattr(mods[name], "relative_position_bias_table", None)
        assert table is None or table.shape[1] == h  # Swin: one column per head


@pytest.mark.parametrize("make", [timm_vit, timm_swin])
def test_timm_attributes_follow_the_heads(make):
    model, x = build(make)
    slim = gp.apply(model, gp.plan(model, x, heads=0.5))
    for m in slim.modules():
        if hasattr(m, "relative_position_bias_table"):  # head_dim 16 in both stages; 2 and 4 heads before
            assert m.num_heads == m.relative_position_bias_table.shape[1] in (1, 2)
            assert m.qkv.out_features == 3 * m.num_heads * 16 == 3 * m.proj.in_features
        elif type(m).__name__ == "Attention":
            assert m.attn_dim == m.num_heads * m.head_dim == m.proj.in_features == m.qkv.out_features // 3
            assert m.head_dim == 16 and m.num_heads == 2


def test_heads_alone_keep_every_channel():
    model, x = build(tv_vit)
    plan = gp.plan(model, x, heads=0.5)
    assert plan.groups and all(g.kind == "head" for g in plan.groups)
    slim = gp.apply(model, plan)
    for m in slim.modules():
        if isinstance(m, nn.MultiheadAttention):
            assert (m.num_heads, m.head_dim, m.embed_dim) == (2, 16, 64)
            assert m.in_proj_weight.shape == (3 * 32, 64) and m.out_proj.weight.shape == (64, 32)
    assert gp.verify(model, slim, plan, x).exact


@pytest.mark.parametrize("make", [tv_vit, tv_swin])
def test_torchvision_pruned_modules_pickle_and_prune_again(make):
    """Swapped-in forwards (attention width != embedding width) survive
    torch.save / load and are captured again as one op (iterative pruning)."""
    model, x = build(make)
    slim = gp.apply(model, gp.plan(model, x, ratio=0.25, heads=0.5))
    swapped = [m for m in slim.modules() if type(m) in (HeadPrunedMultiheadAttention, window_attention_class())]
    assert swapped
    buf = io.BytesIO()
    torch.save(slim, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(x), slim(x))
    plan = gp.plan(slim, x, heads=0.5)
    assert any(g.kind == "head" for g in plan.groups)
    assert gp.verify(slim, gp.apply(slim, plan), plan, x).exact


T, S = 5, 7
MASKS = {"bool": torch.rand(T, S, generator=torch.Generator().manual_seed(1)) > 0.7,
         "float": torch.randn(T, S, generator=torch.Generator().manual_seed(2)),
         "padding": torch.arange(S).expand(2, -1) > 3}
MHA_CALLS = {
    "self, no weights": lambda m, x, y: m(x, x, x, need_weights=False),
    "cross, averaged weights": lambda m, x, y: m(x, y, y),
    "per-head weights": lambda m, x, y: m(x, y, y, average_attn_weights=False),
    "bool attn mask": lambda m, x, y: m(x, y, y, attn_mask=MASKS["bool"]),
    "float attn mask, padding": lambda m, x, y: m(x, y, y, attn_mask=MASKS["float"],
                                                  key_padding_mask=MASKS["padding"], need_weights=False),
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("call", sorted(MHA_CALLS))
def test_head_pruned_mha_computes_what_the_parent_computes(call, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    ours = copy.deepcopy(mha)
    ours.__class__ = HeadPrunedMultiheadAttention
    x, y = torch.randn(2, T, 16), torch.randn(2, S, 16)
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    with torch.no_grad():
        want, got = MHA_CALLS[call](mha, x, y), MHA_CALLS[call](ours, x, y)
    for a, b in zip(want, got):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("shift", [[0, 0], [2, 2]])
def test_head_pruned_window_attention_computes_what_the_parent_computes(shift):
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    torch.manual_seed(0)
    attn = ShiftedWindowAttention(16, [4, 4], shift, num_heads=2).eval()
    ours = copy.deepcopy(attn)
    ours.__class__ = window_attention_class()
    x = torch.randn(2, 6, 10, 16)  # padded to whole windows inside
    with torch.no_grad():
        assert torch.allclose(attn(x), ours(x), atol=1e-6)


class MaskedAttention(nn.Module):
    def __init__(self, per_head):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(16, 4, batch_first=True), nn.Linear(16, 3)
        self.register_buffer("mask", torch.zeros(8, 5, 5) if per_head else torch.zeros(5, 5))

    def forward(self, x):
        return self.fc(self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0])


def test_a_mask_with_one_slice_per_head_pins_the_heads():
    x = torch.randn(2, 5, 16)
    shared, per_head = lively(MaskedAttention(False)), lively(MaskedAttention(True))
    assert [g.kept_units for g in gp.plan(shared, x, heads=0.5).groups] == [2]
    (group,) = [g for g in gp.analyze(per_head, x).groups if g.kind == "head"]
    assert group.n_prunable == 0 and "one slice per head" in group.reasons[0]
    assert not gp.plan(per_head, x, heads=0.5).groups
