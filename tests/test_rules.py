"""Unit tests of the coupling rules on hand-built IR graphs (no torch)."""

import pytest

from graphprune.coupling import couple, list_rules
from graphprune.errors import UnsupportedOpError
from graphprune.ir import Graph


def conv(g, x, name, cin, cout, hw=8, groups=1, bias=True):
    w = g.add_param(f"{name}.weight", (cout, cin // groups, 3, 3))
    b = g.add_param(f"{name}.bias", (cout,)) if bias else None
    return g.add_node("conv", [x, w, b], [(1, cout, hw, hw)], name=name, attrs={"groups": groups}).outputs[0]


def bn(g, x, name, c, hw=8):
    ps = [g.add_param(f"{name}.{p}", (c,), is_buffer=p.startswith("running")) for p in
          ("weight", "bias", "running_mean", "running_var")]
    return g.add_node("batch_norm", [x] + ps, [(1, c, hw, hw)], name=name).outputs[0]


def head(g, x, c, hw=8):
    p = g.add_node("pool", [x], [(1, c, 1, 1)], attrs={"axes": [2, 3]}).outputs[0]
    f = g.add_node("reshape", [p], [(1, c)]).outputs[0]
    w = g.add_param("fc.weight", (10, c))
    out = g.add_node("linear", [f, w, None], [(1, 10)], name="fc").outputs[0]
    g.set_outputs([out])


def group_of(coupling, param, axis=0):
    for grp in coupling.groups:
        for m in grp.members:
            if m.param == param and m.axis == axis:
                return grp
    raise AssertionError(f"{param} not in any group")


def members(grp):
    return {(m.param, m.axis, m.role) for m in grp.members}


def test_conv_bn_conv_chain():
    g = Graph()
    x = g.add_input("x", (1, 3, 8, 8))
    h = bn(g, conv(g, x, "c1", 3, 8), "bn1", 8)
    h = g.add_node("relu", [h], [(1, 8, 8, 8)]).outputs[0]
    head(g, conv(g, h, "c2", 8, 16), 16)
    c = couple(g)
    grp = group_of(c, "c1.weight")
    assert members(grp) == {("c1.weight", 0, "out"), ("c1.bias", 0, "out"), ("bn1.weight", 0, "out"),
                            ("bn1.bias", 0, "out"), ("bn1.running_mean", 0, "out"),
                            ("bn1.running_var", 0, "out"), ("c2.weight", 1, "in")}
    assert grp.width == 8 and grp.n_prunable == 8
    assert group_of(c, "c2.weight").width == 16
    assert group_of(c, "fc.weight").n_prunable == 0  # graph output never shrinks
    assert group_of(c, "c1.weight", 1).n_prunable == 0  # image channels


def test_residual_add_unifies():
    g = Graph()
    x = g.add_input("x", (1, 3, 8, 8))
    a = conv(g, x, "a", 3, 8)
    b = conv(g, a, "b", 8, 8)
    s = g.add_node("add", [a, b], [(1, 8, 8, 8)]).outputs[0]
    head(g, s, 8)
    c = couple(g)
    assert group_of(c, "a.weight") is group_of(c, "b.weight")
    assert ("b.weight", 1, "in") in members(group_of(c, "a.weight"))


def test_concat_offsets_and_split_equal_chunks():
    g = Graph()
    x = g.add_input("x", (1, 3, 8, 8))
    a, b = conv(g, x, "a", 3, 4), conv(g, x, "b", 3, 6)
    cat = g.add_node("cat", [a, b], [(1, 10, 8, 8)], attrs={"axis": 1}).outputs[0]
    head(g, conv(g, cat, "c", 10, 4), 4)
    c = couple(g)
    ga, gb = group_of(c, "a.weight"), group_of(c, "b.weight")
    assert ga is not gb
    ma = next(m for m in ga.members if m.param == "c.weight")
    mb = next(m for m in gb.members if m.param == "c.weight")
    assert ma.indices == (0, 1, 2, 3) and mb.indices == tuple(range(4, 10))


def test_equal_split_ties_chunks():
    g = Graph()
    x = g.add_input("x", (1, 3, 8, 8))
    a = conv(g, x, "a", 3, 8)
    sp = g.add_node("split", [a], [(1, 4, 8, 8), (1, 4, 8, 8)], attrs={"axis": 1, "sizes": [4, 4], "equal": True})
    y = g.add_node("add", sp.outputs, [(1, 4, 8, 8)]).outputs[0]
    head(g, y, 4)
    grp = group_of(couple(g), "a.weight")
    assert grp.width == 4  # chunk k keeps the same positions as chunk 0
    m = next(m for m in grp.members if m.param == "a.weight")
    assert len(m.indices) == 8


def test_grouped_conv_prunes_whole_groups():
    g = Graph()
    x = g.add_input("x", (1, 3, 8, 8))
    a = conv(g, x, "a", 3, 8)
    d = conv(g, a, "dw", 8, 8, groups=4)
    head(g, d, 8)
    c = couple(g)
    grp = group_of(c, "a.weight")
    assert grp is group_of(c, "dw.weight")
    assert grp.width == 4  # one unit per group of two channels
    assert ("dw.weight", 0, "out") in members(grp)


def test_shuffle_reshape_with_literal_groups():
    g = Graph()
    x = g.add_input("x", (1, 3, 8, 8))
    a = conv(g, x, "a", 3, 8)
    v = g.add_node("reshape", [a], [(1, 2, 4, 8, 8)], attrs={"static": [False, True, False, False, False]})
    t = g.add_node("permute", v.outputs, [(1, 4, 2, 8, 8)], attrs={"perm": [0, 2, 1, 3, 4]})
    r = g.add_node("reshape", t.outputs, [(1, 8, 8, 8)], attrs={"static": [False] * 4})
    head(g, r.outputs[0], 8)
    grp = group_of(couple(g), "a.weight")
    assert grp.width == 4 and grp.n_prunable == 4  # the group factor (2) cannot shrink


def test_flatten_into_linear_maps_blocks():
    g = Graph()
    x = g.add_input("x", (1, 3, 2, 2))
    a = g.add_node("conv", [x, g.add_param("a.weight", (4, 3, 1, 1)), None], [(1, 4, 2, 2)],
                   attrs={"groups": 1}).outputs[0]
    f = g.add_node("reshape", [a], [(1, 16)]).outputs[0]
    out = g.add_node("linear", [f, g.add_param("fc.weight", (5, 16)), None], [(1, 5)]).outputs[0]
    g.set_outputs([out])
    grp = group_of(couple(g), "a.weight")
    m = next(m for m in grp.members if m.param == "fc.weight")
    assert m.axis == 1 and len(m.indices) == 16
    assert m.units[0:4] == (m.units[0],) * 4  # each channel owns a block of H*W columns


def test_layer_norm_is_lossy():
    g = Graph()
    x = g.add_input("x", (1, 5, 8))
    h = g.add_node("linear", [x, g.add_param("l1.weight", (16, 8)), None], [(1, 5, 16)]).outputs[0]
    n = g.add_node("layer_norm", [h, g.add_param("ln.weight", (16,)), g.add_param("ln.bias", (16,))],
                   [(1, 5, 16)], attrs={"normalized_ndim": 1}).outputs[0]
    out = g.add_node("linear", [n, g.add_param("l2.weight", (4, 16)), None], [(1, 5, 4)]).outputs[0]
    g.set_outputs([out])
    assert group_of(couple(g), "l1.weight").lossy


def test_unknown_op_is_a_barrier_and_strict_raises():
    g = Graph()
    x = g.add_input("x", (1, 3, 8, 8))
    a = conv(g, x, "a", 3, 8)
    m = g.add_node("mystery", [a], [(1, 8, 8, 8)], source="call_function my.mystery").outputs[0]
    head(g, conv(g, m, "b", 8, 8), 8)
    c = couple(g)
    assert group_of(c, "a.weight").n_prunable == 0
    assert any("mystery" in b for b in c.barriers)
    with pytest.raises(UnsupportedOpError, match=r"op 'mystery'.*node 'mystery'"):
        couple(g, strict=True)


def test_constant_operand_pins_channels():
    g = Graph()
    x = g.add_input("x", (1, 3, 8, 8))
    const = g.add_input("const", (1, 8, 1, 1))
    a = conv(g, x, "a", 3, 8)
    s = g.add_node("add", [a, const], [(1, 8, 8, 8)]).outputs[0]
    head(g, s, 8)
    assert group_of(couple(g), "a.weight").n_prunable == 0


def test_registry_lists_core_rules():
    rules = set(list_rules())
    assert {"conv", "linear", "batch_norm", "layer_norm", "add", "mul", "cat", "split", "reshape",
            "permute", "pool", "mha"} <= rules


def attention(g, x, name, c=8, heads=2, hd=3, table=True, tokens=5):
    """One ``mha`` op as the fx frontend emits it for timm / torchvision attention modules."""
    inner = heads * hd
    ps = [g.add_param(f"{name}.qkv.weight", (3 * inner, c)), g.add_param(f"{name}.qkv.bias", (3 * inner,)),
          g.add_param(f"{name}.proj.weight", (c, inner)), g.add_param(f"{name}.proj.bias", (c,))]
    tab = g.add_param(f"{name}.relative_position_bias_table", (9, heads)) if table else None
    return g.add_node("mha", [x, x, x, *ps, tab], [(1, tokens, c)], name=name,
                      attrs={"num_heads": heads, "head_dim": hd}).outputs[0]


def test_attention_module_units_are_whole_heads():
    g = Graph()
    x = g.add_input("x", (1, 5, 4))
    h = g.add_node("linear", [x, g.add_param("embed.weight", (8, 4)), None], [(1, 5, 8)], name="embed").outputs[0]
    a = attention(g, h, "attn")
    s = g.add_node("add", [h, a], [(1, 5, 8)]).outputs[0]
    out = g.add_node("linear", [s, g.add_param("fc.weight", (2, 8)), None], [(1, 5, 2)], name="fc").outputs[0]
    g.set_outputs([out])
    c = couple(g)
    grp = group_of(c, "attn.qkv.weight")
    assert grp.kind == "head" and grp.width == 2 and grp.n_prunable == 2 and not grp.lossy
    assert members(grp) == {("attn.qkv.weight", 0, "out"), ("attn.qkv.bias", 0, "out"), ("attn.proj.weight", 1, "in"),
                            ("attn.relative_position_bias_table", 1, "out")}
    rows = next(m for m in grp.members if m.param == "attn.qkv.weight")
    head0 = rows.units[0]
    assert [i for i, u in zip(rows.indices, rows.units) if u == head0] == [0, 1, 2, 6, 7, 8, 12, 13, 14]  # q, k, v rows
    stream = group_of(c, "embed.weight")
    assert stream.kind == "channel" and stream.width == 8
    assert {("attn.qkv.weight", 1, "in"), ("attn.proj.weight", 0, "out")} <= members(stream)


def test_attention_module_with_an_unexpected_layout_is_fixed():
    g = Graph()
    x = g.add_input("x", (1, 5, 8))
    h = g.add_node("linear", [x, g.add_param("embed.weight", (8, 8)), None], [(1, 5, 8)], name="embed").outputs[0]
    a = attention(g, h, "attn", heads=2, hd=3, table=False)
    a.producer.attrs["head_dim"] = 4  # rows are not [3, heads, head_dim]
    out = g.add_node("linear", [a, g.add_param("fc.weight", (2, 8)), None], [(1, 5, 2)], name="fc").outputs[0]
    g.set_outputs([out])
    grp = group_of(couple(g), "attn.qkv.weight")
    assert grp.kind == "channel" and grp.n_prunable == 0 and any("not [3, 2, 4]" in r for r in grp.reasons)
