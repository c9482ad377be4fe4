"""LayerFold on ONNX: BatchNorms and linear pairs folded exactly, refusals with reasons, the input
untouched, and ``graphprune fold`` end to end with one-line errors on bad input."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from helpers import lively
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import f32, model, vi

from graphprune.cli import main
from graphprune.errors import CaptureError, InvalidArgumentError, PlanError
from graphprune.layerfold import FoldPlan
from graphprune.layerfold.onnx_fold import apply_fold_onnx, fold_onnx, onnx_depth, plan_fold_onnx
from graphprune.verify.onnx_verify import run_onnx

n = helper.make_node


def ops(m):
    return [node.op_type for node in m.graph.node]


def feed(shape, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def check_folded(m, x, folded, report):
    """The folded model is valid, runs and matches the original in onnxruntime (independently of the report)."""
    onnx.checker.check_model(folded, full_check=True)
    want, got = run_onnx(m, x), run_onnx(folded, x)
    scale = max(float(np.abs(w).max()) for w in want)
    assert scale > 1e-3, "a degenerate output hides every error"
    assert max(float(np.abs(a - b).max()) for a, b in zip(want, got)) <= 1e-4 * scale
    assert report.max_abs_diff <= report.tolerance


def out(name, rank, elem=TensorProto.FLOAT):
    """A graph output of known rank and symbolic dims (the checker needs a shape)."""
    return helper.make_tensor_value_info(name, elem, [f"{name}_{i}" for i in range(rank)])


def steps(plan, kind, status=None):
    return [s for s in plan.steps if s.kind == kind and (status is None or s.status == status)]


# -- torchvision exports (BatchNormalization kept with TrainingMode.PRESERVE) --------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import torchvision

    def export(name):
        path = tmp_path_factory.mktemp("tv") / f"{name}.onnx"
        net = lively(torchvision.models.get_model(name, weights=None))
        torch.onnx.export(net, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        return path
    return export


@pytest.mark.parametrize("name, n_bn", [("resnet18", 20), ("mobilenet_v2", 52)])
def test_torchvision_batchnorms_fold_exactly(exported, name, n_bn):
    path = exported(name)
    data = path.read_bytes()
    m = onnx.load(str(path))
    assert ops(m).count("BatchNormalization") == n_bn, "the export must keep BatchNorm unfused"
    x = feed((2, 3, 64, 64))
    folded, report = fold_onnx(str(path), x)
    assert path.read_bytes() == data, "the input file changed"
    assert len(steps(report.plan, "bn", "exact")) == n_bn and "BatchNormalization" not in ops(folded)
    assert report.depth_before == report.depth_after == onnx_depth(m) == onnx_depth(folded)
    assert report.macs_before == report.macs_after > 0
    assert report.plan.meta["nodes_after"] == len(folded.graph.node) < len(m.graph.node)
    check_folded(m, x, folded, report)
    bn_inits = [t.name for t in folded.graph.initializer if "running" in t.name]
    assert not bn_inits, "BatchNorm statistics must not survive the fold"


# -- hand-built pairs -----------------------------------------------------------------------------

def conv_pair(w1, w2, first=None, second=None, b1=True, b2=True, x=(1, 4, 12, 12), between=()):
    """x -> Conv(w1) [-> between...] -> Conv(w2) -> y."""
    first, second = first or {}, second or {}
    inits = [f32("w1", w1), f32("w2", w2)] + ([f32("b1", (w1[0],))] if b1 else []) + \
            ([f32("b2", (w2[0],))] if b2 else [])
    mid = "c1"
    nodes = [n("Conv", ["x", "w1", *(["b1"] if b1 else [])], ["c1"], name="conv1", **first)]
    for i, op in enumerate(between):
        nodes.append(n(op, [mid], [f"m{i}"], name=f"{op.lower()}{i}"))
        mid = f"m{i}"
    nodes.append(n("Conv", [mid, "w2", *(["b2"] if b2 else [])], ["y"], name="conv2", **second))
    return model(nodes, [vi("x", list(x))], [out("y", len(x))], inits)


PAIRS = {
    "stride2": (dict(w1=(8, 4, 3, 3), w2=(6, 8, 1, 1), first=dict(strides=[2, 2])), "conv1"),
    "strides_both": (dict(w1=(8, 4, 1, 1), w2=(6, 8, 3, 3), first=dict(strides=[2, 2]), second=dict(strides=[2, 2]),
                          b1=False), "conv1"),
    "groups": (dict(w1=(8, 2, 3, 3), w2=(8, 4, 1, 1), first=dict(group=2, pads=[1, 1, 1, 1]), second=dict(group=2)),
               "conv1"),
    "depthwise_then_pointwise": (dict(w1=(4, 1, 3, 3), w2=(6, 4, 1, 1), first=dict(group=4)), "conv1"),
    "1x1_then_padded_3x3": (dict(w1=(8, 4, 1, 1), w2=(6, 8, 3, 3), second=dict(pads=[1, 1, 1, 1]), b1=False),
                            "conv1"),
    "dilated": (dict(w1=(8, 4, 3, 3), w2=(6, 8, 3, 3), first=dict(dilations=[2, 2]), b2=False), "conv1"),
    "identity_dropout_between": (dict(w1=(8, 4, 1, 1), w2=(6, 8, 1, 1), between=("Identity", "Dropout")), "conv1"),
    "conv1d": (dict(w1=(8, 4, 3), w2=(6, 8, 1), x=(1, 4, 16)), "conv1"),
}


@pytest.mark.parametrize("case", list(PAIRS))
def test_conv_pairs_fold_exactly(case):
    kwargs, name = PAIRS[case]
    m = conv_pair(**kwargs)
    x = feed(kwargs.get("x", (1, 4, 12, 12)))
    before = m.SerializeToString()
    folded, report = fold_onnx(m, x, only_if_cheaper=False)
    assert m.SerializeToString() == before, "the caller's model changed"
    assert [s.status for s in report.plan.steps] == ["exact"] and report.plan.steps[0].kind == "conv_pair"
    assert ops(folded) == ["Conv"] and folded.graph.node[0].name == name
    assert (report.depth_before, report.depth_after) == (2, 1)
    check_folded(m, x, folded, report)


def test_padded_pair_is_refused_with_its_reason_unless_forced():
    m = conv_pair((8, 4, 3, 3), (6, 8, 3, 3), first=dict(pads=[1, 1, 1, 1]), second=dict(pads=[1, 1, 1, 1]))
    x = feed((1, 4, 12, 12))
    plan = plan_fold_onnx(m, x, only_if_cheaper=False)
    (step,) = plan.steps
    assert step.status == "refused" and "padding of the intermediate map cannot move" in step.reason
    assert step.modules == ("conv1", "conv2")
    folded, report = fold_onnx(m, x)
    assert ops(folded) == ["Conv", "Conv"] and report.max_abs_diff == 0
    forced, report = fold_onnx(m, x, force=True, only_if_cheaper=False)
    assert ops(forced) == ["Conv"] and report.plan.forced
    assert report.forced_max_abs_diff > report.tolerance, "moved padding changes the border"


def test_bias_of_the_first_layer_blocks_moving_padding():
    m = conv_pair((8, 4, 1, 1), (6, 8, 3, 3), second=dict(pads=[1, 1, 1, 1]), b1=True)
    (step,) = plan_fold_onnx(m, only_if_cheaper=False).steps
    assert step.status == "refused" and "bias makes its output border non-zero" in step.reason


def test_costlier_fold_is_refused_by_default():
    m = conv_pair((2, 8, 3, 3), (8, 2, 3, 3), x=(1, 8, 12, 12))  # a thin middle: the merged 5x5 is dense
    (step,) = plan_fold_onnx(m).steps
    assert step.status == "refused" and "costs more" in step.reason and step.macs_after > step.macs_before
    assert plan_fold_onnx(m, only_if_cheaper=False).steps[0].status == "exact"


def test_auto_pad_same_and_asymmetric_pads_are_refused():
    same = conv_pair((8, 4, 3, 3), (6, 8, 1, 1), first=dict(auto_pad="SAME_UPPER"))
    assert "auto_pad=SAME_UPPER" in plan_fold_onnx(same).steps[0].reason
    skew = conv_pair((8, 4, 3, 3), (6, 8, 1, 1), first=dict(pads=[0, 0, 1, 1]))
    assert "asymmetrically" in plan_fold_onnx(skew).steps[0].reason


def test_a_value_with_two_readers_is_not_folded():
    nodes = [n("Conv", ["x", "w1"], ["c1"], name="conv1"), n("Conv", ["c1", "w2"], ["y"], name="conv2"),
             n("Relu", ["c1"], ["z"], name="side")]
    m = model(nodes, [vi("x", [1, 4, 8, 8])], [out("y", 4), out("z", 4)],
              [f32("w1", (8, 4, 1, 1)), f32("w2", (6, 8, 1, 1))])
    (step,) = plan_fold_onnx(m).steps
    assert step.status == "refused" and "'c1' has 2 readers" in step.reason


def linear_chain(kind, dims=(16, 32, 24, 8), act=None):
    """Three linear layers: Gemm (several conventions) or MatMul + Add on a 3-d input."""
    nodes, inits, h = [], [], "x"
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        dst = "y" if i == len(dims) - 2 else f"h{i}"
        if kind == "gemm":
            trans = i % 2
            inits += [f32(f"w{i}", (b, a) if trans else (a, b)), f32(f"b{i}", (1, b) if i == 1 else (b,))]
            nodes.append(n("Gemm", [h, f"w{i}", f"b{i}"], [dst], name=f"fc{i}", transB=trans, alpha=0.5 + i,
                           beta=2.0 - i * 0.5))
        else:
            inits += [f32(f"w{i}", (a, b)), f32(f"b{i}", (b,))]
            nodes += [n("MatMul", [h, f"w{i}"], [f"mm{i}"], name=f"fc{i}"),
                      n("Add", [f"mm{i}", f"b{i}"], [dst], name=f"fc{i}.bias")]
        if act and dst != "y":
            nodes.append(n(act, [dst], [dst + "a"], name=f"act{i}"))
            dst += "a"
        h = dst
    shape = [2, dims[0]] if kind == "gemm" else [1, 5, dims[0]]
    return model(nodes, [vi("x", shape)], [out("y", len(shape))], inits), shape


@pytest.mark.parametrize("kind", ["gemm", "matmul"])
def test_linear_chains_fold_into_one_layer(kind):
    m, shape = linear_chain(kind)
    x = feed(shape)
    folded, report = fold_onnx(m, x)
    assert [s.status for s in report.plan.steps] == ["exact", "exact"]
    assert {s.kind for s in report.plan.steps} == {"linear_pair"}
    assert ops(folded) == (["Gemm"] if kind == "gemm" else ["MatMul", "Add"])
    assert (report.depth_before, report.depth_after) == (3, 1) and report.macs_after < report.macs_before
    check_folded(m, x, folded, report)


def test_linearised_activations_let_pairs_fold():
    m, shape = linear_chain("matmul", act="Relu")
    x = feed(shape)
    plan = plan_fold_onnx(m, x)
    assert not plan.steps, "a Relu between two layers is no adjacency"
    folded, report = fold_onnx(m, x, linearise=["act0", "act1"])
    assert ops(folded) == ["MatMul", "Add"] and report.plan.linearised_nodes == ("act0", "act1")
    reference = apply_fold_onnx(m, FoldPlan((), linearised_nodes=("act0", "act1")))
    assert "Relu" not in ops(reference)
    want, got = run_onnx(reference, x), run_onnx(folded, x)
    assert np.allclose(want[0], got[0], rtol=1e-4, atol=1e-5) and report.max_abs_diff <= report.tolerance
    with pytest.raises(InvalidArgumentError, match="no node 'nope'"):
        plan_fold_onnx(m, linearise=["nope"])
    with pytest.raises(InvalidArgumentError, match="only one-input activations"):
        plan_fold_onnx(m, linearise=["fc0"])


# -- BatchNorm placements, by hand ----------------------------------------------------------------

def bn_inits(c, prefix="bn"):
    rng = np.random.default_rng(3)
    arrays = [rng.random(c) + 0.5, rng.standard_normal(c) * 0.1, rng.standard_normal(c) * 0.1, rng.random(c) + 0.5]
    return [numpy_helper.from_array(a.astype(np.float32), f"{prefix}.{k}")
            for a, k in zip(arrays, ("scale", "bias", "mean", "var"))]


def bn_node(src, dst, prefix="bn", **kw):
    return n("BatchNormalization", [src, *(f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var"))], [dst],
             name=prefix, epsilon=1e-3, **kw)


@pytest.mark.parametrize("pads, status", [([0, 0, 0, 0], "exact"), ([1, 1, 1, 1], "refused")])
def test_batchnorm_before_a_conv(pads, status):
    nodes = [n("Relu", ["x"], ["r"], name="relu"), bn_node("r", "b"),
             n("Conv", ["b", "w", "wb"], ["y"], name="conv", group=2, pads=pads)]
    m = model(nodes, [vi("x", [1, 4, 8, 8])], [out("y", 4)], [f32("w", (6, 2, 3, 3)), f32("wb", (6,))] + bn_inits(4))
    x = feed((1, 4, 8, 8))
    folded, report = fold_onnx(m, x)
    (step,) = report.plan.steps
    assert (step.kind, step.where, step.status, step.modules) == ("bn", "before", status, ("conv", "bn"))
    if status == "refused":
        assert "zero-padded conv" in step.reason and "BatchNormalization" in ops(folded)
    else:
        assert ops(folded) == ["Relu", "Conv"]
    check_folded(m, x, folded, report)


def test_batchnorm_after_gemm_and_matmul_without_bias():
    nodes = [n("Gemm", ["x", "w1"], ["g"], name="fc1", transB=1), bn_node("g", "b1", "bn1"),
             n("Relu", ["b1"], ["r"], name="relu"), n("MatMul", ["r", "w2"], ["mm"], name="fc2"),
             bn_node("mm", "y", "bn2")]
    inits = [f32("w1", (12, 6)), f32("w2", (12, 5))] + bn_inits(12, "bn1") + bn_inits(5, "bn2")
    m = model(nodes, [vi("x", [3, 6])], [out("y", 2)], inits)
    x = feed((3, 6))
    folded, report = fold_onnx(m, x)
    assert [(s.modules, s.status) for s in report.plan.steps] == [(("fc1", "bn1"), "exact"), (("fc2", "bn2"), "exact")]
    assert ops(folded) == ["Gemm", "Relu", "MatMul", "Add"]
    check_folded(m, x, folded, report)


def test_batchnorm_refusals_name_their_reason():
    nodes = [n("Relu", ["x"], ["r"], name="relu"), bn_node("r", "b"), n("Relu", ["b"], ["y"], name="relu2")]
    m = model(nodes, [vi("x", [1, 4, 8, 8])], [out("y", 4)], bn_inits(4))
    (step,) = plan_fold_onnx(m).steps
    assert step.status == "refused" and "no conv/linear next to it" in step.reason
    bn = bn_node("c", "y", training_mode=1)
    bn.output.extend(["running_mean", "running_var"])
    train = model([n("Conv", ["x", "w"], ["c"], name="conv"), bn],
                  [vi("x", [2, 4, 8, 8])], [out("y", 4)], [f32("w", (4, 4, 1, 1))] + bn_inits(4))
    (step,) = plan_fold_onnx(train).steps
    assert step.status == "refused" and "training mode" in step.reason


# -- plans ----------------------------------------------------------------------------------------

def test_plan_round_trips_through_json_and_rejects_another_model():
    m, shape = linear_chain("gemm")
    plan = plan_fold_onnx(m)
    again = apply_fold_onnx(m, FoldPlan.from_json(plan.to_json()))
    assert again.SerializeToString() == apply_fold_onnx(m, plan).SerializeToString()
    other, _ = linear_chain("matmul")
    with pytest.raises(PlanError, match="fc0"):
        apply_fold_onnx(conv_pair((8, 4, 1, 1), (6, 8, 1, 1)), plan)
    with pytest.raises(InvalidArgumentError, match="FoldPlan"):
        apply_fold_onnx(other, "not a plan")


# -- command line ---------------------------------------------------------------------------------

def test_cli_folds_end_to_end(tmp_path):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    m = conv_pair((8, 4, 1, 1), (6, 8, 3, 3), second=dict(pads=[1, 1, 1, 1]), b1=False)
    onnx.save(m, str(src))
    data = src.read_bytes()
    res = subprocess.run([sys.executable, "-m", "graphprune", "fold", str(src), "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for word in ("folded", "depth      2 -> 1", "MACs", "verify", "wrote"):
        assert word in res.stdout
    assert src.read_bytes() == data
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    x = feed((1, 4, 12, 12))
    assert ops(folded) == ["Conv"] and np.allclose(run_onnx(m, x)[0], run_onnx(folded, x)[0], atol=1e-5)


def test_cli_prints_refusals(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(conv_pair((8, 4, 3, 3), (6, 8, 3, 3), second=dict(pads=[1, 1, 1, 1])), str(src))
    assert main(["fold", str(src), "-o", str(tmp_path / "o.onnx"), "--allow-costlier"]) == 0
    assert "refused    conv_pair conv1 + conv2: padding of the intermediate map" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "corrupt", "not_onnx", "same_file", "bad_linearise"])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    args = ["fold", str(src), "-o", str(out)]
    if case == "corrupt":
        src.write_bytes(np.random.default_rng(0).bytes(2048))
    elif case == "not_onnx":
        args[1] = str(tmp_path / "model.pt")
    elif case in ("same_file", "bad_linearise"):
        onnx.save(conv_pair((8, 4, 1, 1), (6, 8, 1, 1)), str(src))
        args += ["-o", str(src)] if case == "same_file" else ["--linearise", "conv1"]
    before = src.read_bytes() if src.exists() else None
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphprune: error:") and err.strip().count("\n") == 0 and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.suffix == ".onnx" and p != src]
    assert (src.read_bytes() if src.exists() else None) == before


def test_api_bad_input_is_typed(tmp_path):
    with pytest.raises(CaptureError, match="no such ONNX file"):
        plan_fold_onnx(str(tmp_path / "absent.onnx"))
    with pytest.raises(CaptureError, match="ModelProto or a path"):
        fold_onnx(42)


def test_bn_dtype_and_graph_output_edge_cases():
    """A layer output that is also a graph output keeps its BatchNorm; float64 weights stay float64."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4)), "w")
    bn = [numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name) for t in bn_inits(4)]
    nodes = [n("MatMul", ["x", "w"], ["c"], name="fc"), bn_node("c", "y")]
    dbl = TensorProto.DOUBLE
    xin = helper.make_tensor_value_info("x", dbl, [2, 3])
    m = model(nodes, [xin], [out("y", 2, dbl)], [w] + bn)
    x = {"x": np.random.default_rng(2).standard_normal((2, 3))}
    folded, report = fold_onnx(m, x)
    assert ops(folded) == ["MatMul", "Add"]
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.DOUBLE}
    assert report.max_abs_diff < 1e-12
    shared = model(nodes, [xin], [out("y", 2, dbl), out("c", 2, dbl)], [w] + bn)
    (step,) = plan_fold_onnx(shared).steps
    assert step.status == "refused" and "graph output" in step.reason


def test_a_shared_weight_is_copied_not_rewritten():
    """Two convs read one weight initializer: folding a BatchNorm into one gives it its own copy."""
    nodes = [n("Conv", ["x", "w"], ["a"], name="ca"), bn_node("a", "ab"), n("Relu", ["ab"], ["r"], name="relu"),
             n("Conv", ["r", "w"], ["y"], name="cb")]
    m = model(nodes, [vi("x", [1, 4, 6, 6])], [out("y", 4)], [f32("w", (4, 4, 1, 1))] + bn_inits(4))
    x = feed((1, 4, 6, 6))
    folded, report = fold_onnx(m, x)
    assert ops(folded) == ["Conv", "Relu", "Conv"]
    reads = {node.name: node.input[1] for node in folded.graph.node if node.op_type == "Conv"}
    assert reads["cb"] == "w" and reads["ca"] != "w"
    check_folded(m, x, folded, report)


def test_a_value_read_inside_a_subgraph_is_not_private():
    branch = [helper.make_graph([n("Identity", ["a"], [k])], k, [], [out(k, 4)]) for k in ("t", "e")]
    nodes = [n("Conv", ["x", "w1"], ["a"], name="c1"), n("Conv", ["a", "w2"], ["y"], name="c2"),
             n("If", ["cond"], ["z"], then_branch=branch[0], else_branch=branch[1], name="if")]
    m = model(nodes, [vi("x", [1, 4, 6, 6]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
              [out("y", 4), out("z", 4)], [f32("w1", (8, 4, 1, 1)), f32("w2", (8, 8, 1, 1))])
    (step,) = plan_fold_onnx(m).steps
    assert step.status == "refused" and "subgraph" in step.reason
