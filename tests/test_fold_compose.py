"""The numpy fold math against torch.nn.functional (float64 oracle)."""

import ast
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphprune.errors import GraphPruneError
from graphprune.layerfold.compose import (
    ConvConfig,
    ConvLayer,
    FoldError,
    add_identity,
    compose,
    compose_linear,
    compose_linear_chain,
    compose_refusal,
    composite_config,
    config_refusal,
    fold_affine,
    fold_bn,
    layer_macs,
    residual_refusal,
)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def t(a):
    return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))


def rand_conv(cout, cin, k, stride=1, padding=0, dilation=1, groups=1, bias=True, nd=2, seed=0):
    rng = np.random.default_rng(seed)
    kernel = (k,) * nd if isinstance(k, int) else tuple(k)
    w = rng.standard_normal((cout, cin // groups, *kernel))
    return ConvLayer.conv(w, rng.standard_normal(cout) if bias else None, stride, padding, dilation, groups)


def run(x, *layers):
    """Apply the layers in order with torch (conv or linear by dimensionality)."""
    for layer in layers:
        c = layer.config
        if not c.nd:
            x = F.linear(x, t(layer.weight), t(layer.bias))
        else:
            x = CONV[c.nd](x, t(layer.weight), t(layer.bias), c.stride, c.padding, c.dilation, c.groups)
    return x


def image(cin, nd=2, size=13, seed=1):
    return torch.randn(2, cin, *(size,) * nd, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_close(a, b):
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), float((a - b).abs().max())


# -- BatchNorm -----------------------------------------------------------------------------------------

def bn_params(c, seed=2):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(c) * 0.1, rng.random(c) + 0.5, 1e-5, rng.random(c) + 0.5, rng.standard_normal(c)


def bn(x, mean, var, eps, gamma, beta):
    return F.batch_norm(x, t(mean), t(var), t(gamma), t(beta), False, 0.0, eps)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_bn_after_conv(bias, groups):
    conv = rand_conv(6, 4, 3, padding=1, groups=groups, bias=bias)
    p = bn_params(6)
    w, b = fold_bn(conv.weight, conv.bias, *p, where="after")
    x = image(4)
    assert_close(run(x, ConvLayer(w, b, conv.config)), bn(run(x, conv), *p))
    tw, tb = torch.nn.utils.fusion.fuse_conv_bn_weights(t(conv.weight), t(conv.bias), *map(t, p[:2]), p[2],
                                                        *map(t, p[3:]))
    assert np.allclose(w, tw.detach().numpy()) and np.allclose(b, tb.detach().numpy())


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_bn_before_unpadded_conv(groups):
    conv = rand_conv(8, 4, 3, stride=2, groups=groups)
    p = bn_params(4)
    w, b = fold_bn(conv.weight, conv.bias, *p, where="before", groups=groups, padding=conv.config.padding)
    x = image(4)
    assert_close(run(x, ConvLayer(w, b, conv.config)), run(bn(x, *p), conv))


def test_bn_after_and_before_linear():
    rng = np.random.default_rng(0)
    lin = ConvLayer.linear(rng.standard_normal((5, 3)), rng.standard_normal(5))
    x = torch.randn(7, 3, dtype=torch.float64)
    after, before = bn_params(5), bn_params(3)
    w, b = fold_bn(lin.weight, lin.bias, *after)
    assert_close(run(x, ConvLayer.linear(w, b)), bn(run(x, lin), *after))
    w, b = fold_bn(lin.weight, None, *before, where="before")
    assert_close(run(x, ConvLayer.linear(w, b)), run(bn(x, *before), ConvLayer.linear(lin.weight)))


def test_bn_without_affine_is_plain_normalisation():
    conv = rand_conv(3, 3, 1)
    mean, var, eps, _, _ = bn_params(3)
    w, b = fold_bn(conv.weight, conv.bias, mean, var, eps, None, None)
    x = image(3)
    assert_close(run(x, ConvLayer(w, b, conv.config)), bn(run(x, conv), mean, var, eps, None, None))


def test_bn_before_padded_conv_is_refused_and_forced_error_is_at_the_border():
    conv = rand_conv(4, 4, 3, padding=1)
    p = bn_params(4)
    with pytest.raises(FoldError, match="padding of the normalised map"):
        fold_bn(conv.weight, conv.bias, *p, where="before", padding=conv.config.padding)
    w, b = fold_bn(conv.weight, conv.bias, *p, where="before", padding=conv.config.padding, force=True)
    x = image(4)
    got, want = run(x, ConvLayer(w, b, conv.config)), run(bn(x, *p), conv)
    assert_close(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1])
    assert (got - want).abs().max() > 1e-3


def test_bn_before_reflect_padded_conv_is_exact():
    conv = rand_conv(4, 4, 3)
    scale, shift = np.random.default_rng(3).random(4) + 0.5, np.random.default_rng(4).standard_normal(4)
    w, b = fold_affine(conv.weight, conv.bias, scale, shift, where="before", padding=(1, 1), padding_mode="reflect")
    x = image(4)
    affine = x * t(scale).view(1, -1, 1, 1) + t(shift).view(1, -1, 1, 1)
    want = F.conv2d(F.pad(affine, (1, 1, 1, 1), mode="reflect"), t(conv.weight), t(conv.bias))
    got = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), t(w), t(b))
    assert_close(got, want)


# -- Linear o Linear -------------------------------------------------------------------------------------

@pytest.mark.parametrize("b1", [True, False])
@pytest.mark.parametrize("b2", [True, False])
def test_linear_pair_every_bias_combination(b1, b2):
    rng = np.random.default_rng(5)
    first = ConvLayer.linear(rng.standard_normal((6, 4)), rng.standard_normal(6) if b1 else None)
    second = ConvLayer.linear(rng.standard_normal((3, 6)), rng.standard_normal(3) if b2 else None)
    w, b = compose_linear(first.weight, first.bias, second.weight, second.bias)
    assert (b is None) == (not b1 and not b2)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    want = run(x, first, second)
    assert_close(run(x, ConvLayer.linear(w, b)), want)
    assert_close(run(x, compose(first, second)), want)  # the 0-d conv path agrees


def test_linear_chain_in_any_association_is_the_sequence():
    rng = np.random.default_rng(7)
    dims = [9, 40, 40, 3]
    layers = [ConvLayer.linear(rng.standard_normal((o, i)), rng.standard_normal(o) if k != 1 else None)
              for k, (i, o) in enumerate(zip(dims, dims[1:]))]
    x = torch.randn(4, 9, dtype=torch.float64)
    assert_close(run(x, compose_linear_chain(layers)), run(x, *layers))
    with pytest.raises(FoldError, match="Linear"):
        compose_linear_chain([rand_conv(4, 4, 1)])


def test_linear_pair_shape_mismatch_is_refused():
    with pytest.raises(FoldError, match="cannot compose linear"):
        compose_linear(np.ones((3, 2)), None, np.ones((4, 5)), None)


# -- Conv o Conv -----------------------------------------------------------------------------------------

PAIRS = {
    # name: (first, second, expected composite (kernel, stride, dilation, groups, padding))
    "3x3-then-3x3-unpadded": (rand_conv(6, 4, 3, padding=1), rand_conv(5, 6, 3, seed=1), (5, 1, 1, 1, 1)),
    "stride2": (rand_conv(6, 4, 3, stride=2, padding=1), rand_conv(5, 6, 3, stride=2, seed=1), (7, 4, 1, 1, 1)),
    "dilation2-both": (rand_conv(6, 4, 3, dilation=2), rand_conv(5, 6, 3, dilation=2, seed=1), (5, 1, 2, 1, 0)),
    "dilation2-first": (rand_conv(6, 4, 3, dilation=2, padding=2), rand_conv(5, 6, 3, seed=1), (7, 1, 1, 1, 2)),
    "groups-aligned": (rand_conv(8, 4, 3, groups=2), rand_conv(6, 8, 3, groups=2, seed=1), (5, 1, 1, 2, 0)),
    "groups-4-then-2": (rand_conv(8, 8, 1, groups=4), rand_conv(6, 8, 3, groups=2, seed=1), (3, 1, 1, 2, 0)),
    "depthwise-then-pointwise": (rand_conv(4, 4, 3, groups=4, padding=1), rand_conv(7, 4, 1, seed=1),
                                 (3, 1, 1, 1, 1)),
    "pointwise-then-depthwise": (rand_conv(4, 3, 1), rand_conv(4, 4, 3, groups=4, seed=1), (3, 1, 1, 1, 0)),
    "depthwise-then-depthwise": (rand_conv(4, 4, 3, groups=4), rand_conv(4, 4, 3, groups=4, seed=1),
                                 (5, 1, 1, 4, 0)),
    "1x1-then-3x3": (rand_conv(6, 4, 1), rand_conv(5, 6, 3, seed=1), (3, 1, 1, 1, 0)),
    "3x3-then-1x1": (rand_conv(6, 4, 3, padding=1), rand_conv(5, 6, 1, seed=1), (3, 1, 1, 1, 1)),
    "1x1-bias-free-then-padded-3x3": (rand_conv(6, 4, 1, bias=False), rand_conv(5, 6, 3, padding=1, seed=1),
                                      (3, 1, 1, 1, 1)),
    "strided-1x1-bias-free-then-padded-3x3": (rand_conv(6, 4, 1, stride=2, bias=False),
                                              rand_conv(5, 6, 3, padding=1, seed=1), (3, 2, 2, 1, 2)),
    "dilated-kernel-from-stride": (rand_conv(6, 4, 1, stride=2), rand_conv(5, 6, 3, seed=1), (3, 2, 2, 1, 0)),
    "bias-free-both": (rand_conv(6, 4, 3, bias=False), rand_conv(5, 6, 3, bias=False, seed=1), (5, 1, 1, 1, 0)),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_conv_pair_is_one_exact_conv(name):
    first, second, (k, s, d, g, p) = PAIRS[name]
    assert compose_refusal(first, second) is None
    both = compose(first, second)
    c = both.config
    assert (c.kernel, c.stride, c.dilation, c.groups, c.padding) == ((k, k), (s, s), (d, d), g, (p, p))
    x = image(first.config.in_channels, size=17)
    assert_close(run(x, both), run(x, first, second))
    assert (both.bias is None) == (first.bias is None and second.bias is None)


@pytest.mark.parametrize("nd", [1, 3])
def test_conv_pair_in_1d_and_3d(nd):
    first = rand_conv(4, 2, 3, stride=2, padding=1, nd=nd)
    second = rand_conv(3, 4, 3, dilation=2, nd=nd, seed=1)
    x = image(2, nd=nd, size=11)
    assert_close(run(x, compose(first, second)), run(x, first, second))


def test_padding_that_cannot_move_is_refused_and_force_errs_only_at_the_border():
    first, second = rand_conv(4, 4, 3, padding=1), rand_conv(4, 4, 3, padding=1, seed=1)
    reason = compose_refusal(first, second)
    assert reason.startswith("padding of the intermediate map cannot move to the input: ")
    with pytest.raises(FoldError, match="cannot move"):
        compose(first, second)
    x = image(4, size=15)
    got, want = run(x, compose(first, second, force=True)), run(x, first, second)
    assert got.shape == want.shape
    assert_close(got[..., 2:-2, 2:-2], want[..., 2:-2, 2:-2])
    assert (got - want).abs().max() > 1e-3


@pytest.mark.parametrize("first, why", [
    (rand_conv(4, 4, 1), "bias"),                       # 1x1, but a bias makes the border non-zero
    (rand_conv(4, 4, 3, bias=False), "kernel"),          # zero bias, but a 3x3 reads beyond the border
])
def test_padding_refusal_names_the_cause(first, why):
    assert why in compose_refusal(first, rand_conv(4, 4, 3, padding=1))


def test_config_refusal_takes_the_bias_as_a_flag():
    first, second = rand_conv(4, 4, 1), rand_conv(4, 4, 3, padding=1)
    assert config_refusal(first.config, second.config, first_bias_zero=True) is None
    assert config_refusal(first.config, second.config, first_bias_zero=False) == compose_refusal(first, second)


def test_zero_bias_counts_as_no_bias():
    first = rand_conv(4, 4, 1)
    first = ConvLayer(first.weight, np.zeros(4), first.config)
    second = rand_conv(4, 4, 3, padding=1, seed=1)
    x = image(4)
    assert_close(run(x, compose(first, second)), run(x, first, second))


def test_shape_refusals_hold_even_when_forced():
    assert "cannot compose" in compose_refusal(rand_conv(4, 4, 3), rand_conv(4, 4, 3, nd=1), force=True)
    assert "channel mismatch" in compose_refusal(rand_conv(4, 4, 3), rand_conv(4, 5, 3), force=True)
    with pytest.raises(FoldError):
        compose(rand_conv(4, 4, 3), rand_conv(4, 5, 3), force=True)


def test_invalid_layers_raise_typed_errors():
    with pytest.raises(FoldError, match="weight shape"):
        ConvLayer(np.ones((4, 3, 3, 3)), None, ConvConfig(4, 4, (3, 3), (1, 1), (0, 0), (1, 1)))
    with pytest.raises(FoldError, match="groups"):
        ConvConfig(4, 6, (3,), (1,), (0,), (1,), groups=4)
    assert issubclass(FoldError, GraphPruneError)


@st.composite
def conv_pairs(draw):
    nd = draw(st.sampled_from([1, 2]))
    g1, g2 = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    cin, cmid, cout = 2 * draw(st.integers(1, 2)), 2 * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 2))

    def layer(cout_, cin_, groups, seed):
        k = draw(st.sampled_from([1, 2, 3]))
        return rand_conv(cout_, cin_, k, draw(st.integers(1, 2)), draw(st.integers(0, 1)), draw(st.integers(1, 2)),
                         groups, draw(st.booleans()), nd, seed)

    return layer(cmid, cin, g1, 0), layer(cout, cmid, g2, 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_pairs())
def test_property_composite_matches_sequence_unless_refused(pair):
    first, second = pair
    x = image(first.config.in_channels, nd=first.config.nd, size=12)
    want = run(x, first, second)
    got = run(x, compose(first, second, force=True))
    assert got.shape == want.shape  # moved padding keeps every output size
    reason = compose_refusal(first, second)
    if reason is None:
        assert_close(got, want)
        assert composite_config(first.config, second.config) == compose(first, second).config
    else:  # only moved padding is ever refused for matching channels
        assert second.config.padded and reason.startswith("padding of the intermediate map")


# -- residual ------------------------------------------------------------------------------------------

def test_residual_linear_adds_identity():
    rng = np.random.default_rng(6)
    lin = ConvLayer.linear(rng.standard_normal((5, 5)), rng.standard_normal(5))
    x = torch.randn(3, 5, dtype=torch.float64)
    assert_close(run(x, add_identity(lin)), x + run(x, lin))


@pytest.mark.parametrize("k, dilation, groups", [(3, 1, 1), (3, 2, 2), (5, 1, 4), (1, 1, 1)])
def test_residual_conv_adds_identity_at_the_kernel_centre(k, dilation, groups):
    conv = rand_conv(4, 4, k, padding=dilation * (k - 1) // 2, dilation=dilation, groups=groups)
    x = image(4)
    assert_close(run(x, add_identity(conv)), x + run(x, conv))


@pytest.mark.parametrize("layer, why", [
    (rand_conv(4, 4, 3, stride=2, padding=1), "stride"),
    (rand_conv(4, 4, 3), "'same' padding"),
    (rand_conv(6, 4, 3, padding=1), "equal channels"),
])
def test_residual_refusals(layer, why):
    assert why in residual_refusal(layer.config)
    with pytest.raises(FoldError):
        add_identity(layer)


# -- cost and purity -------------------------------------------------------------------------------------

def test_macs_of_conv_and_linear():
    assert layer_macs(rand_conv(32, 16, 3, groups=2).config, (2, 32, 8, 8)) == 2 * 8 * 8 * 32 * 8 * 9
    assert layer_macs(ConvLayer.linear(np.ones((7, 5))).config, (3, 4, 7)) == 3 * 4 * 7 * 5
    with pytest.raises(FoldError, match="channels"):
        layer_macs(rand_conv(32, 16, 3).config, (2, 16, 8, 8))


def test_a_merged_5x5_can_cost_more_than_two_thin_3x3():
    squeeze, expand = rand_conv(4, 64, 3), rand_conv(64, 4, 3, seed=1)  # 64 -> 4 -> 64, unpadded
    merged = composite_config(squeeze.config, expand.config)
    before = layer_macs(squeeze.config, (1, 4, 8, 8)) + layer_macs(expand.config, (1, 64, 6, 6))
    assert merged.kernel == (5, 5) and layer_macs(merged, (1, 64, 6, 6)) > before


@pytest.mark.parametrize("module", ["compose.py", "plan.py"])
def test_framework_free_modules_import_no_framework(module):
    path = pathlib.Path(__file__).parent.parent / "graphprune" / "layerfold" / module
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "onnx", "onnxruntime"}
