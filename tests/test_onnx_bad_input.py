"""Bad ONNX input: one-line typed errors, the input untouched, nothing written."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import conv_net, f32, model, vi

import graphprune as gp
from graphprune.cli import main


def _one_line(err):
    assert "\n" not in str(err.value) and str(err.value)


def _save(m, path):
    onnx.save(m, str(path))
    return path.read_bytes()


def test_truncated_file(tmp_path):
    good = tmp_path / "good.onnx"
    data = _save(conv_net(), good)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(gp.CaptureError) as err:
        gp.plan_onnx(str(bad))
    _one_line(err)
    assert bad.read_bytes() == data[: len(data) // 2]


def test_corrupt_file(tmp_path):
    bad = tmp_path / "noise.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(gp.CaptureError) as err:
        gp.prune_onnx(str(bad))
    _one_line(err)


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(gp.CaptureError, match="no such ONNX file"):
        gp.plan_onnx(str(tmp_path / "absent.onnx"))
    with pytest.raises(gp.CaptureError, match="ModelProto or a path"):
        gp.plan_onnx(42)


def lrn_net():
    """A conv followed by LRN, an op that mixes channels and has no rule."""
    n = helper.make_node
    nodes = [n("Conv", ["x", "w", "b"], ["c"], name="conv"), n("LRN", ["c"], ["l"], size=3, name="lrn1"),
             n("Conv", ["l", "w2"], ["y"], name="conv2")]
    inits = [f32("w", (8, 3, 1, 1)), f32("b", (8,)), f32("w2", (4, 8, 1, 1))]
    return model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], inits)


def test_op_without_rule_is_a_barrier_or_strict_error():
    m = lrn_net()
    plan = gp.plan_onnx(m, ratio=0.5)
    assert not plan.groups, "channels must not cross an op without a rule"
    assert any("onnx:LRN" in b and "lrn1" in b for b in plan.meta["barriers"])
    with pytest.raises(gp.UnsupportedOpError, match="onnx:LRN.*lrn1") as err:
        gp.plan_onnx(m, ratio=0.5, strict=True)
    _one_line(err)


def test_shapes_that_cannot_be_inferred():
    n = helper.make_node
    graph = helper.make_graph(
        [n("Conv", ["x", "w"], ["c"], name="conv"), n("Mystery", ["c"], ["m"], domain="com.example", name="odd"),
         n("Relu", ["m"], ["y"], name="relu")],
        "g", [vi("x", [1, 3, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [f32("w", (8, 3, 1, 1))])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    before = m.SerializeToString()
    with pytest.raises(gp.CaptureError, match="cannot infer the shape of 'm'.*odd") as err:
        gp.plan_onnx(m)
    _one_line(err)
    assert m.SerializeToString() == before


def test_plan_naming_a_missing_initializer():
    m = conv_net()
    plan = gp.plan_onnx(m, ratio=0.5)
    data = json.loads(plan.to_json())
    data["groups"][0]["members"][0]["name"] = "not.there"
    bad = gp.PruningPlan.from_json(json.dumps(data))
    with pytest.raises(gp.PlanError, match="'not.there'") as err:
        gp.apply_onnx(m, bad)
    _one_line(err)


def test_oracle_catches_a_wrong_slim_model():
    m = conv_net()
    plan = gp.plan_onnx(m, ratio=0.5)
    slim = gp.apply_onnx(m, plan)
    t = next(t for t in slim.graph.initializer if t.name == "c2.w")
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, "c2.w"))
    with pytest.raises(gp.VerificationError, match="worst group") as err:
        gp.verify_onnx(m, slim, plan)
    _one_line(err)


def test_cli_writes_nothing_on_failure(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file at all")
    out = tmp_path / "slim.onnx"
    assert main(["prune", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphprune: error:") and "\n" not in err
    assert not out.exists() and not (tmp_path / "slim.plan.json").exists()


def test_cli_prunes_an_onnx_file(tmp_path, capsys):
    src = tmp_path / "net.onnx"
    data = _save(conv_net(), src)
    out = tmp_path / "net.slim.onnx"
    assert main(["prune", str(src), "--ratio", "0.5"]) == 0
    text = capsys.readouterr().out
    for key in ("params", "MACs", "latency", "oracle"):
        assert key in text
    assert src.read_bytes() == data
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    plan = gp.PruningPlan.from_json((tmp_path / "net.slim.plan.json").read_text())
    assert plan.groups
