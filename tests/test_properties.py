"""Property-based tests: random small CNNs are pruned and checked by the oracle.

A hypothesis strategy draws an *architecture description* (:class:`Arch`: a
list of block specs plus a head) and :func:`build` turns it into a
:class:`RandomNet`.  Blocks mix plain and grouped/depthwise convs, residual
adds (identity or 1x1 projection), two-branch and dense concats, chunk/split
into halves that are processed and concatenated back, channel shuffles,
squeeze-excitation gates and max-pooling; the head is either global pooling
or a flatten of a <= 4x4 map into one or two Linear layers.  Every forward is
a loop over a fixed Python structure, so torch.fx can trace it.  Sizes are
read from the tensor (``x.size(1)``) as real code does, except ``split``,
which passes a literal size on purpose: the pruner must then either leave
those channels alone or keep the halves consistent.

Properties, for any architecture and any ratio in [0, 0.9):

1. plan + apply succeed, the pruned model keeps the class and output shape,
   ``gp.verify`` passes with only exact groups, and the input model is
   bit-identical afterwards (weights, buffers and training flags);
2. parameters and MACs never increase, and parameters strictly decrease
   whenever the uniform ratio must remove a unit of some prunable group;
3. a plan survives a JSON round trip, and the pruned ``state_dict`` loads
   strictly into the same plan applied to a fresh model of the same
   architecture;
4. the oracle is not vacuous: a pruned model with shifted logits fails it.

Examples are derandomised (CI is deterministic) and not shrunk; run with
``GRAPHPRUNE_SHRINK=1`` to get a minimal failing architecture.  Minimal
reproductions of bugs these properties found are kept at the end as regression tests.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

import graphprune as gp

# Deterministic for CI.  Shrinking a failure re-runs plan/apply hundreds of times (minutes), so it is off
# unless GRAPHPRUNE_SHRINK=1 asks for a minimal failing architecture.
PHASES = list(Phase) if os.environ.get("GRAPHPRUNE_SHRINK") == "1" else [p for p in Phase if p is not Phase.shrink]
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True, phases=PHASES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RATIOS = st.floats(min_value=0.0, max_value=0.9, exclude_max=True, allow_nan=False)


# -- architecture descriptions ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """A random CNN: input shape, block specs (dicts with a ``kind``) and head spec."""

    batch: int
    size: int
    blocks: tuple[dict, ...]
    head: dict


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def _draw_block(draw, c: int, s: int) -> tuple[dict, int, int]:
    """One block spec for a ``c``-channel ``s x s`` input; returns (spec, out channels, out size)."""
    width, small = st.integers(4, 32), st.integers(2, 16)
    kinds = ["conv", "gconv", "res", "cat", "se", "chunk", "split"]  # split: torch.split(x, literal size)
    kinds += ["shuffle"] if c % 2 == 0 or c % 3 == 0 else []
    kinds += ["pool"] if s >= 8 else []
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        out, k = draw(width), draw(st.sampled_from([1, 3]))
        return dict(kind=kind, out=out, k=k, bias=draw(st.booleans()), bn=draw(st.booleans())), out, s
    if kind == "gconv":  # groups divide both widths; groups == c is depthwise (with a channel multiplier)
        g = draw(st.sampled_from(_divisors(c)))
        out = g * draw(st.integers(1, max(1, 32 // g)))
        return dict(kind=kind, groups=g, out=out, k=draw(st.sampled_from([1, 3]))), out, s
    if kind == "res":  # identity shortcut when the width is kept, 1x1 projection otherwise
        out = c if draw(st.booleans()) else draw(width)
        return dict(kind=kind, mid=draw(width), out=out), out, s
    if kind == "cat":  # dense: cat([x, branch(x)]) as in DenseNet; norm: BatchNorm right after the cat
        dense = draw(st.booleans())
        left, right = (c if dense else draw(small)), draw(small)
        return dict(kind=kind, dense=dense, left=left, right=right, norm=draw(st.booleans())), left + right, s
    if kind in ("chunk", "split"):  # each half is kept as is or goes through a conv
        outs = tuple(h if draw(st.booleans()) else draw(small) for h in ((c + 1) // 2, c // 2))
        return dict(kind=kind, outs=outs, norm=draw(st.booleans())), sum(outs), s
    if kind == "se":
        return dict(kind=kind, mid=draw(st.integers(1, max(1, c // 2)))), c, s
    if kind == "shuffle":
        return dict(kind=kind, groups=draw(st.sampled_from([g for g in (2, 3, 4) if c % g == 0]))), c, s
    return dict(kind=kind), c, s // 2


@st.composite
def archs(draw) -> Arch:
    """A random small CNN description for a ``batch x 3 x size x size`` input."""
    size = draw(st.sampled_from([8, 16]))
    c, s, blocks = 3, size, []
    for _ in range(draw(st.integers(2, 6))):
        spec, c, s = _draw_block(draw, c, s)
        blocks.append(spec)
    head = dict(flatten=draw(st.booleans()), hidden=draw(st.one_of(st.none(), st.integers(4, 16))),
                classes=draw(st.integers(2, 10)), size=s)
    return Arch(draw(st.integers(1, 2)), size, tuple(blocks), head)


def _conv(out, k=3, bias=False, bn=True):
    return dict(kind="conv", out=out, k=k, bias=bias, bn=bn)


# Hand-written architectures that together use every block kind, run before the random ones so that
# each pattern is checked whatever examples the derandomised search happens to draw.
KITCHEN_SINKS = (
    Arch(1, 8, (_conv(12, k=1, bias=True, bn=False), dict(kind="chunk", outs=(6, 9), norm=False),
                dict(kind="res", mid=8, out=15), dict(kind="cat", dense=True, left=15, right=6, norm=True),
                dict(kind="res", mid=10, out=16), dict(kind="gconv", groups=4, out=8, k=1)),
         dict(flatten=False, hidden=None, classes=3, size=8)),
    Arch(2, 16, (dict(kind="gconv", groups=3, out=6, k=3), dict(kind="cat", dense=False, left=5, right=7, norm=True),
                 dict(kind="chunk", outs=(6, 4), norm=True), dict(kind="shuffle", groups=2), dict(kind="pool"),
                 dict(kind="pool"), dict(kind="se", mid=3)),
         dict(flatten=True, hidden=None, classes=4, size=4)),
    Arch(2, 16, (_conv(8), dict(kind="split", outs=(4, 6), norm=True), dict(kind="gconv", groups=10, out=20, k=3),
                 dict(kind="shuffle", groups=2), dict(kind="se", mid=5), dict(kind="pool")),
         dict(flatten=True, hidden=12, classes=5, size=8)),
)


# -- the modules the descriptions turn into --------------------------------------------------------------------------

def conv_bn(cin: int, cout: int, k: int = 1, groups: int = 1, bias: bool = False, bn: bool = True,
            act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)]
    layers += [nn.BatchNorm2d(cout)] if bn else []
    layers += [nn.ReLU()] if act else []
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int, mid: int, out: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, mid, 3), conv_bn(mid, out, 1, act=False))
        self.proj = nn.Identity() if out == c else conv_bn(c, out, 1, act=False)

    def forward(self, x):
        return torch.relu(self.body(x) + self.proj(x))


def post_norm(c: int, norm: bool) -> nn.Module:
    """BatchNorm + ReLU on a concatenation (a norm that several groups share), or nothing."""
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()) if norm else nn.Identity()


class Concat(nn.Module):
    def __init__(self, c: int, dense: bool, left: int, right: int, norm: bool):
        super().__init__()
        self.left = nn.Identity() if dense else conv_bn(c, left, 1)
        self.right = conv_bn(c, right, 3)
        self.post = post_norm(left + right, norm)

    def forward(self, x):
        return self.post(torch.cat([self.left(x), self.right(x)], dim=1))


class Halves(nn.Module):
    """Split the channels in two (chunk, or split with a literal size), process each half, concat."""

    def __init__(self, c: int, split: bool, outs: tuple[int, int], norm: bool):
        super().__init__()
        self.split_size = (c + 1) // 2 if split else None  # same halves as chunk
        ins = ((c + 1) // 2, c // 2)
        self.left, self.right = (nn.Identity() if o == i else conv_bn(i, o, 3) for i, o in zip(ins, outs))
        self.post = post_norm(sum(outs), norm)

    def forward(self, x):
        if self.split_size is not None:  # a Python attribute: fixed at trace time
            parts = torch.split(x, self.split_size, dim=1)
        else:
            parts = torch.chunk(x, 2, dim=1)
        return self.post(torch.cat([self.left(parts[0]), self.right(parts[1])], dim=1))


class Shuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        b, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
        x = x.view(b, self.groups, c // self.groups, h, w)
        return x.transpose(1, 2).reshape(b, -1, h, w)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, mid: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, mid, 1)
        self.expand = nn.Conv2d(mid, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(self.pool(x)))))


class Head(nn.Module):
    """Global average pool, or a flatten of a 4x4 map, into one or two Linear layers."""

    def __init__(self, c: int, flatten: bool, hidden: int | None, classes: int, size: int):
        super().__init__()
        if flatten:
            self.pool = nn.MaxPool2d(size // 4) if size > 4 else nn.Identity()
            features = c * min(size, 4) ** 2
        else:
            self.pool, features = nn.AdaptiveAvgPool2d(1), c
        if hidden is None:
            self.fc = nn.Linear(features, classes)
        else:
            self.fc = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


def make_block(c: int, spec: dict) -> nn.Module:
    kind = spec["kind"]
    if kind == "conv":
        return conv_bn(c, spec["out"], spec["k"], bias=spec["bias"], bn=spec["bn"])
    if kind == "gconv":
        return conv_bn(c, spec["out"], spec["k"], groups=spec["groups"])
    if kind == "res":
        return Residual(c, spec["mid"], spec["out"])
    if kind == "cat":
        return Concat(c, spec["dense"], spec["left"], spec["right"], spec["norm"])
    if kind in ("chunk", "split"):
        return Halves(c, kind == "split", spec["outs"], spec["norm"])
    if kind == "shuffle":
        return Shuffle(spec["groups"])
    if kind == "se":
        return SqueezeExcite(c, spec["mid"])
    assert kind == "pool", kind
    return nn.MaxPool2d(2)


def out_channels(c: int, spec: dict) -> int:
    kind = spec["kind"]
    if kind in ("conv", "gconv", "res"):
        return spec["out"]
    if kind == "cat":
        return spec["left"] + spec["right"]
    if kind in ("chunk", "split"):
        return sum(spec["outs"])
    return c


class RandomNet(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        c, blocks = 3, []
        for spec in arch.blocks:
            blocks.append(make_block(c, spec))
            c = out_channels(c, spec)
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(c, **arch.head)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@torch.no_grad()
def build(arch: Arch, seed: int = 0) -> tuple[RandomNet, torch.Tensor]:
    """Model (deterministic in ``seed``, lively BatchNorm statistics) and an example input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RandomNet(arch)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n) + 0.5)
                m.bias.copy_(torch.randn(n) * 0.1)
                m.running_mean.copy_(torch.randn(n) * 0.1)
                m.running_var.copy_(torch.rand(n) + 0.5)
        x = torch.randn(arch.batch, 3, arch.size, arch.size)
    return model, x


# -- helpers ---------------------------------------------------------------------------------------------------------

def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], training: list[bool]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"the input model's '{k}' was modified"
    assert [m.training for m in model.modules()] == training


@torch.no_grad()
def forward_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def removes_something(model: nn.Module, x: torch.Tensor, ratio: float) -> bool:
    """Whether a uniform ``ratio`` must remove a unit: a prunable group with floor(ratio * width) >= 1."""
    return any(g.n_prunable > 0 and g.width >= 2 and math.floor(ratio * g.width) >= 1
               for g in gp.analyze(model, x).groups)


# -- properties ------------------------------------------------------------------------------------------------------

@settings(max_examples=30, **SETTINGS)
@example(arch=KITCHEN_SINKS[0], ratio=0.5, importance="l2", round_to=1)
@example(arch=KITCHEN_SINKS[1], ratio=0.7, importance="random", round_to=2)
@example(arch=KITCHEN_SINKS[2], ratio=0.5, importance="l1", round_to=1)
@given(arch=archs(), ratio=RATIOS, importance=st.sampled_from(["l1", "l2", "random"]), round_to=st.sampled_from([1, 2]))
def test_pruned_model_matches_oracle_and_input_is_untouched(arch, ratio, importance, round_to):
    for spec in arch.blocks:
        event(f"block {spec['kind']}")
    model, x = build(arch)
    model.train()  # any forward pass in training mode would change the BatchNorm running statistics
    before, training = snapshot(model), [m.training for m in model.modules()]
    expected_shape = forward_eval(copy.deepcopy(model), x).shape

    plan = gp.plan(model, x, ratio=ratio, importance=importance, round_to=round_to)
    slim = gp.apply(model, plan)
    assert type(slim) is RandomNet
    assert forward_eval(slim, x).shape == expected_shape
    report = gp.verify(model, slim, plan, x)  # raises VerificationError if slim is wrong
    assert report.max_abs_diff <= report.tolerance
    assert report.lossy_groups == []  # no LayerNorm / attention here: every group must be exact
    for g in plan.groups:
        assert 1 <= g.kept_units < g.width
        assert all(set(m.keep) <= set(m.indices) for m in g.members)
    assert_unchanged(model, before, training)


@settings(max_examples=20, **SETTINGS)
@given(arch=archs(), ratio=RATIOS)
def test_parameter_count_never_increases(arch, ratio):
    model, x = build(arch)
    slim = gp.apply(model, gp.plan(model, x, ratio=ratio))
    assert gp.count_params(slim) <= gp.count_params(model)
    assert gp.count_macs(slim, x) <= gp.count_macs(model, x)
    if ratio >= 0.3 and removes_something(model, x, ratio):
        assert gp.count_params(slim) < gp.count_params(model)
    if ratio == 0.0:
        assert shapes(slim) == shapes(model)


@settings(max_examples=20, **SETTINGS)
@given(arch=archs(), ratio=RATIOS)
def test_plan_json_round_trip_and_state_dict_transfer(arch, ratio):
    model, x = build(arch)
    plan = gp.plan(model, x, ratio=ratio)
    slim = gp.apply(model, plan)

    again = gp.PruningPlan.from_json(plan.to_json())
    assert again.groups == plan.groups
    slim_again = gp.apply(model, again)
    assert shapes(slim_again) == shapes(slim)
    assert all(torch.equal(v, slim.state_dict()[k]) for k, v in slim_again.state_dict().items())

    fresh, _ = build(arch, seed=1)  # same architecture, different weights
    target = gp.apply(fresh, again)
    target.load_state_dict(slim.state_dict(), strict=True)
    assert torch.equal(forward_eval(target, x), forward_eval(slim, x))


@settings(max_examples=8, **SETTINGS)
@given(arch=archs(), ratio=RATIOS)
def test_oracle_rejects_a_wrong_pruned_model(arch, ratio):
    """The oracle is not vacuous: shifting every logit of the pruned model by 1 must be caught."""
    model, x = build(arch)
    plan = gp.plan(model, x, ratio=ratio)
    slim = gp.apply(model, plan)
    last = [m for m in slim.head.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias += 1.0
    with pytest.raises(gp.VerificationError):
        gp.verify(model, slim, plan, x)


# -- minimal reproductions of bugs the properties found --------------------------------------------------------------

class SplitLiteral(nn.Module):
    """``torch.split`` with a literal int size, then the two pieces are used."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        parts = torch.split(self.conv(x), 2, dim=1)
        return self.head(torch.cat([parts[0], parts[1]], dim=1))


def test_split_with_literal_size_is_pruned_consistently():
    """Regression: ``split(x, 2)`` has a literal piece size, so its channels must stay."""
    torch.manual_seed(0)
    model, x = SplitLiteral(), torch.randn(1, 3, 4, 4)
    plan = gp.plan(model, x, ratio=0.5)
    slim = gp.apply(model, plan)
    assert slim(x).shape == model(x).shape
    gp.verify(model, slim, plan, x)


def test_verify_reports_a_crashing_pruned_model_as_verification_error():
    """Regression: a pruned model that does not run fails verification (typed error)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)), torch.randn(1, 3, 4, 4)
    plan = gp.plan(model, x, ratio=0.5)
    slim = gp.apply(model, plan)
    slim[2] = nn.Conv2d(4, 2, 1)  # still reads the 4 channels that the plan removed
    with pytest.raises(gp.VerificationError):
        gp.verify(model, slim, plan, x)
