"""Hand-built ONNX graphs (not written by PyTorch) prune, pass the full
checker, run in onnxruntime and satisfy the oracle; rewritten shape
constants and attributes have the values the new widths require."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx_graphs import conv_net, mlp, transformer_block

import graphprune as gp
from graphprune.verify.onnx_verify import run_onnx


def _init(m, name):
    return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))


def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _prune(m, inputs, ratio=0.5):
    before = m.SerializeToString()
    plan = gp.plan_onnx(m, ratio=ratio, inputs=inputs)
    slim = gp.apply_onnx(m, plan, inputs=inputs)
    assert m.SerializeToString() == before, "the caller's model changed"
    onnx.checker.check_model(slim, full_check=True)
    out = run_onnx(slim, inputs)
    assert [o.shape for o in out] == [o.shape for o in run_onnx(m, inputs)]
    report = gp.verify_onnx(m, slim, plan, inputs)
    assert report.max_abs_diff <= report.tolerance and report.scale > 0
    assert gp.count_params_onnx(slim) < gp.count_params_onnx(m)
    return plan, slim, report


def test_conv_net_with_mul_add_affine_residual_concat_slice_depthwise():
    m = conv_net()
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    plan, slim, report = _prune(m, x)
    assert report.exact and report.exact_groups >= 2
    trunk = next({mem.name for mem in g.members} for g in plan.groups
                 if any(mem.name == "c1.w" and mem.axis == 0 for mem in g.members))
    assert {"c1.w", "s1", "b1", "c2.w", "c2.b", "c3.w", "dw.w", "fc.w"} <= trunk
    assert _init(slim, "c1.w").shape[0] == 4 and _init(slim, "s1").shape == (4, 1, 1)
    dw = _init(slim, "dw.w").shape[0]
    group = next(a.i for a in _node(slim, "dw").attribute if a.name == "group")
    assert group == dw == _init(slim, "fc.w").shape[1]
    c3_removed = plan.removals()[("c3.w", 0)]
    assert _init(slim, "sl.ends").tolist() == [4 + sum(1 for i in range(4) if i not in c3_removed)]


def test_mlp_with_transposed_weight_and_gemm_without_transb():
    m = mlp()
    x = {"x": np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)}
    plan, slim, report = _prune(m, x)
    assert report.exact and len(plan.groups) == 3
    assert _init(slim, "w1").shape == (16, 16)   # [I, O]: columns pruned
    assert _init(slim, "w2").shape == (16, 12)   # Gemm transB=0: [I, O]
    assert _init(slim, "w3").shape == (10, 12)   # transposed into MatMul: [O, I]
    assert _init(slim, "w4").shape == (5, 10)    # Gemm transB=1: [O, I], output kept


def test_transformer_block_rewrites_split_and_reshape_constants():
    m = transformer_block()
    x = {"x": np.random.default_rng(3).standard_normal((1, 6, 16)).astype(np.float32)}
    plan, slim, report = _prune(m, x)
    assert report.exact, "no group crosses the LayerNorm: the residual stream reaches the output"
    assert _init(slim, "split").tolist() == [8, 8, 8]
    for name in ("heads_q", "heads_k", "heads_v"):
        assert _init(slim, name).tolist() == [1, 6, 2, 4]
    assert _init(slim, "width").tolist() == [8]
    assert _init(slim, "wqkv").shape == (16, 24) and _init(slim, "w1").shape == (16, 16)


def test_transformer_block_prunes_heads_dims_shared_by_q_and_k():
    coupling = gp.analyze_onnx(transformer_block())
    widths = sorted(g.width for g in coupling.groups if g.n_prunable)
    assert widths == [8, 8, 32]   # q/k head dim, v head dim, MLP hidden
    qk = next(g for g in coupling.groups if g.n_prunable and g.width == 8
              and any(mem.param == "wqkv" and max(mem.indices) < 32 for mem in g.members))
    wqkv = next(mem for mem in qk.members if mem.param == "wqkv")
    assert len(wqkv.indices) == 32   # 8 dims x 2 heads x (q and k)


@pytest.mark.parametrize("build", [conv_net, mlp, transformer_block])
def test_prune_onnx_one_call_equals_plan_then_apply(build):
    m = build()
    slim = gp.prune_onnx(m, ratio=0.3)
    plan = gp.plan_onnx(m, ratio=0.3)
    assert slim.SerializeToString() == gp.apply_onnx(m, plan).SerializeToString()


def test_scale_computed_from_head_width_makes_attention_lossy():
    m = transformer_block(computed_scale=True)
    x = {"x": np.random.default_rng(4).standard_normal((1, 6, 16)).astype(np.float32)}
    plan, slim, report = _prune(m, x)
    lossy = [g for g in plan.groups if g.lossy]
    assert len(lossy) == 1 and any(mem.name == "wqkv" for mem in lossy[0].members)
    assert report.lossy_max_abs_diff > report.tolerance, "the scale really changes"


def test_external_data_file_and_metadata_are_kept(tmp_path):
    m = conv_net()
    m.metadata_props.add(key="author", value="tests")
    path = tmp_path / "ext.onnx"
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    plan = gp.plan_onnx(str(path), ratio=0.5)
    slim = gp.apply_onnx(str(path), plan)
    assert slim.opset_import == m.opset_import and slim.producer_name == "tests"
    assert {p.key: p.value for p in slim.metadata_props} == {"author": "tests"}
    gp.verify_onnx(str(path), slim, plan)
