"""Small PyTorch models, one per op pattern: prune, run, and prove with the oracle."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_untouched, lively, snapshot

import graphprune as gp


class SEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x * s, 1), 1))


class ConcatChunkShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        y1, y2 = y.chunk(2, dim=1)
        y = torch.cat([y1, F.relu(self.dw(y2))], 1)
        b, c, h, w = y.size()
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        y = F.adaptive_avg_pool2d(self.pw(y), 4)
        return self.head(torch.flatten(y, 1))


class LayerScaleLN(nn.Module):
    """ConvNeXt-style: depthwise conv, permute, LayerNorm, MLP, layer scale."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.ln = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.gamma = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.ln(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        x = x + self.gamma * y
        return self.head(x.mean((2, 3)))


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, stride=4)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp1, self.mlp2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.mlp2(F.relu(self.mlp1(x)))
        return self.head(self.ln(x).mean(1))


CASES = {"se": SEBlock, "concat_chunk_shuffle": ConcatChunkShuffle, "layerscale_ln": LayerScaleLN,
         "tiny_vit": TinyViT}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_pattern_prunes_exactly(name, ratio):
    model = lively(CASES[name]())
    x = torch.randn(2, 3, 16, 16)
    snap = snapshot(model)
    plan = gp.plan(model, x, ratio=ratio)
    slim = gp.apply(model, plan)
    assert_untouched(model, snap)
    assert type(slim) is type(model)
    assert slim(x).shape == model(x).shape
    assert gp.count_params(slim) < gp.count_params(model)
    report = gp.verify(model, slim, plan, x)
    assert report.max_abs_diff <= report.tolerance
    assert report.exact_groups > 0


def test_lossy_groups_are_reported_not_passed():
    model = lively(LayerScaleLN())
    x = torch.randn(2, 3, 16, 16)
    plan = gp.plan(model, x, ratio=0.5)
    assert plan.lossy_groups, "the LayerNorm-coupled stream must be marked lossy"
    report = gp.verify(model, gp.apply(model, plan), plan, x)
    assert report.lossy_groups == plan.lossy_groups
    assert report.lossy_max_abs_diff > 0
    assert "lossy" in str(report)


def test_mha_attributes_follow_the_weights():
    model = lively(TinyViT())
    x = torch.randn(2, 3, 16, 16)
    slim = gp.prune(model, x, ratio=0.5)  # embedding width halves, heads stay
    attn = slim.attn
    assert attn.embed_dim == attn.in_proj_weight.shape[1] == 8
    assert attn.head_dim * attn.num_heads == attn.in_proj_weight.shape[0] // 3 == attn.out_proj.in_features
    assert attn.num_heads == model.attn.num_heads
    assert slim.mlp1.out_features == slim.mlp1.weight.shape[0] == 16
    slim = gp.prune(model, x, ratio=0.5, heads=0.5)
    assert slim.attn.num_heads == model.attn.num_heads // 2 and slim.attn.head_dim == model.attn.head_dim


def test_verify_catches_a_wrong_rewrite():
    model = lively(SEBlock())
    x = torch.randn(2, 3, 16, 16)
    plan = gp.plan(model, x, ratio=0.5)
    slim = gp.apply(model, plan)
    with torch.no_grad():
        slim.conv.weight[0].mul_(-3.0)  # a rewrite that computes something else
    with pytest.raises(gp.VerificationError, match="worst group"):
        gp.verify(model, slim, plan, x)


def test_inplace_modifies_and_returns_the_same_object():
    model = lively(SEBlock())
    x = torch.randn(1, 3, 16, 16)
    plan = gp.plan(model, x, ratio=0.5)
    slim = gp.apply(model, plan, inplace=True)
    assert slim is model and model.conv.out_channels == 8


def test_verify_checks_the_given_model_when_groups_are_lossy():
    model = lively(LayerScaleLN())
    x = torch.randn(2, 3, 16, 16)
    plan = gp.plan(model, x, ratio=0.5)
    assert plan.lossy_groups
    slim = gp.apply(model, plan)
    with torch.no_grad():
        slim.head.bias.add_(1.0)  # wrong, but runs
    with pytest.raises(gp.VerificationError, match="rewrite of the plan"):
        gp.verify(model, slim, plan, x)
    slim.head = nn.Linear(3, 5)  # does not even run
    with pytest.raises(gp.VerificationError, match="fails to run"):
        gp.verify(model, slim, plan, x)


class _HandRMS(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("norm", [_HandRMS, nn.RMSNorm], ids=["hand-written", "nn.RMSNorm"])
def test_rmsnorm_on_the_fx_path_is_lossy_not_a_barrier(norm):
    """RMSNorm's mean of squares mixes channels only in the statistic: the channels
    through it are pruned and the group is reported lossy (as on the export path)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), norm(16), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    plan = gp.plan(model, x, ratio=0.5, strict=True)
    assert plan.meta["capture"] == "fx"
    assert [(g.width, g.lossy) for g in plan.groups] == [(16, True)]
    slim = gp.apply(model, plan)
    assert slim[1].weight.shape == (8,) and slim(x).shape == (3, 4)
    report = gp.verify(model, slim, plan, x)
    assert report.lossy_groups and report.exact_groups == 0


class _SdpaAttention(nn.Module):
    """Attention written the way transformer code does: view(B, T, -1, head_dim) and F.sdpa."""

    def __init__(self, dim=32, head_dim=8):
        super().__init__()
        self.hd = head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ff = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.hd ** -0.5)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.ff(x)


def test_sdpa_on_the_fx_path_prunes_whole_heads_exactly():
    torch.manual_seed(0)
    model = _SdpaAttention().eval()
    x = torch.randn(2, 5, 32)
    plan = gp.plan(model, x, ratio=0.5, heads=0.5, strict=True)
    assert plan.meta["capture"] == "fx"
    assert sorted(g.kind for g in plan.groups) == ["channel", "head"]
    slim = gp.apply(model, plan)
    assert slim.q.out_features == 16 and slim.o.in_features == 16 and slim.ff[0].out_features == 32
    assert gp.verify(model, slim, plan, x).exact
