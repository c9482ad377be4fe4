"""Residual blocks in ONNX graphs: found structurally (Add of x and a private branch f(x)), scored by Block
Influence or output MSE, removed with exact bookkeeping (checker, onnxruntime, initializers), the input
untouched, and ``graphprune blocks`` end to end with one-line errors."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from helpers import lively
from onnx import helper
from onnx_graphs import f32, model, transformer_block, vi

from graphprune.cli import main
from graphprune.errors import CaptureError, InvalidArgumentError, PlanError
from graphprune.layerfold.blocks import BlockReport, block_report
from graphprune.layerfold.onnx_blocks import block_report_onnx, find_blocks_onnx, remove_blocks_onnx
from graphprune.onnx_api import count_params_onnx
from graphprune.verify.onnx_verify import run_onnx

n = helper.make_node
PLAIN = [f"/{s}/{s}.{i}/Add" for s, i in (("layer1", 0), ("layer1", 1), ("layer2", 1), ("layer3", 1),
                                          ("layer4", 1))]  # BasicBlocks without downsample
ZEROED = "/layer2/layer2.1/Add"


def adds(m):
    return sum(node.op_type == "Add" for node in m.graph.node)


def images(seed, batch=2):
    return {"x": np.random.default_rng(seed).standard_normal((batch, 3, 64, 64)).astype(np.float32)}


def max_diff(a, b):
    return max(float(np.abs(p - q).max()) for p, q in zip(a, b))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """resnet18 exported (BatchNorm fused by the exporter); ``zeroed``: layer2.1's branch is exactly zero."""
    import torchvision

    def export(zeroed):
        net = lively(torchvision.models.resnet18(weights=None))
        if zeroed:
            block = net.layer2[1]
            with torch.no_grad():
                for t in (block.conv2.weight, block.bn2.weight, block.bn2.bias):
                    t.zero_()
        path = tmp_path_factory.mktemp("r18") / f"resnet18{'_zeroed' if zeroed else ''}.onnx"
        torch.onnx.export(net, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        return path, net
    return {"plain": export(False), "zeroed": export(True)}


def test_resnet18_blocks_are_found_ranked_and_removed(resnet):
    path, _ = resnet["plain"]
    data = path.read_bytes()
    original = onnx.load(str(path))
    blocks = find_blocks_onnx(path)
    assert [b.name for b in blocks] == PLAIN, "the 5 BasicBlocks without downsample, in graph order"
    assert all(b.axis == 1 and b.op_types == ("Conv", "Relu", "Conv") for b in blocks)
    report = block_report_onnx(path, [images(0), images(1)])
    scores = [e.score for e in report]
    assert sorted(report.names()) == sorted(PLAIN) and scores == sorted(scores) and all(0 < s < 1 for s in scores)
    assert all(e.container_kind == "onnx" and e.in_shape == e.out_shape and e.in_shape[0] == 2 for e in report)
    slim = remove_blocks_onnx(path, report, k=2, inputs=images(2))
    onnx.checker.check_model(slim, full_check=True)
    assert adds(original) == 8 and adds(slim) == 6
    names = {node.name for node in slim.graph.node}
    assert not names & set(report.names()[:2]) and set(report.names()[2:]) <= names
    removed = sum(e.params for e in report.entries[:2])
    assert count_params_onnx(slim) == count_params_onnx(original) - removed
    read = {i for node in slim.graph.node for i in node.input}
    assert all(t.name in read for t in slim.graph.initializer), "an initializer nothing reads was kept"
    x = images(3, batch=3)
    assert [o.shape for o in run_onnx(slim, x)] == [o.shape for o in run_onnx(original, x)] == [(3, 1000)]
    assert path.read_bytes() == data, "the input file changed"


def test_zero_branch_scores_zero_ranks_first_and_removal_is_exact(resnet):
    path, net = resnet["zeroed"]
    data = path.read_bytes()
    cal = [images(0), images(1)]
    for method in ("cosine", "loss"):
        report = block_report_onnx(path, cal, method=method)
        assert report.entries[0].name == ZEROED and report.entries[0].score == 0.0
        assert all(e.score > 0 for e in report.entries[1:])
        assert report.baseline == (0.0 if method == "loss" else None)
    slim = remove_blocks_onnx(path, report, k=1)
    assert adds(slim) == 7 and ZEROED not in {node.name for node in slim.graph.node}
    original = onnx.load(str(path))
    for x in cal:
        assert max_diff(run_onnx(original, x), run_onnx(slim, x)) <= 1e-5
    torch_report = block_report(net, [torch.from_numpy(x["x"]) for x in cal])
    assert torch_report.entries[0].name == "layer2.1" and torch_report.entries[0].score == 0.0
    assert path.read_bytes() == data


def test_report_round_trips_through_json_and_names_work(resnet):
    path, _ = resnet["plain"]
    report = block_report_onnx(path, images(0), max_batches=1)
    again = BlockReport.from_dict(json.loads(report.to_json()))
    assert again == report
    by_report = remove_blocks_onnx(path, again, k=1, check=False)
    by_name = remove_blocks_onnx(path, [report.names()[0]], check=False)
    assert by_report.SerializeToString() == by_name.SerializeToString()


def layers(zero_mlp_of=None, tokens=5, embed=8):
    """Two pre-LN transformer layers on ``[B, T, C]`` (MatMul attention and MLP): four residual Adds."""
    nodes, inits, h = [], [], "x"
    for i in range(2):
        p = f"l{i}."
        nodes += [n("LayerNormalization", [h, p + "g1", p + "b1"], [p + "n1"], axis=-1, name=p + "ln1"),
                  n("MatMul", [p + "n1", p + "wq"], [p + "q"], name=p + "q"),
                  n("MatMul", [p + "n1", p + "wk"], [p + "k"], name=p + "k"),
                  n("Transpose", [p + "k"], [p + "kt"], perm=[0, 2, 1], name=p + "kt"),
                  n("MatMul", [p + "q", p + "kt"], [p + "s"], name=p + "scores"),
                  n("Softmax", [p + "s"], [p + "a"], axis=-1, name=p + "softmax"),
                  n("MatMul", [p + "n1", p + "wv"], [p + "v"], name=p + "v"),
                  n("MatMul", [p + "a", p + "v"], [p + "o"], name=p + "context"),
                  n("MatMul", [p + "o", p + "wo"], [p + "att"], name=p + "proj"),
                  n("Add", [h, p + "att"], [p + "h1"], name=p + "attn_residual"),
                  n("LayerNormalization", [p + "h1", p + "g2", p + "b2"], [p + "n2"], axis=-1, name=p + "ln2"),
                  n("MatMul", [p + "n2", p + "w1"], [p + "m1"], name=p + "fc1"),
                  n("Add", [p + "m1", p + "c1"], [p + "m2"], name=p + "fc1.bias"),
                  n("Relu", [p + "m2"], [p + "m3"], name=p + "act"),
                  n("MatMul", [p + "m3", p + "w2"], [p + "m4"], name=p + "fc2"),
                  n("Add", [p + "m4", p + "c2"], [p + "mlp"], name=p + "fc2.bias"),
                  n("Add", [p + "h1", p + "mlp"], ["y" if i else "l0.out"], name=p + "mlp_residual")]
        zero = 0.0 if i == zero_mlp_of else 1.0
        inits += [f32(p + "g1", (embed,)), f32(p + "b1", (embed,)), f32(p + "wq", (embed, embed)),
                  f32(p + "wk", (embed, embed)), f32(p + "wv", (embed, embed)), f32(p + "wo", (embed, embed)),
                  f32(p + "g2", (embed,)), f32(p + "b2", (embed,)), f32(p + "w1", (embed, 2 * embed)),
                  f32(p + "c1", (2 * embed,)), f32(p + "w2", (2 * embed, embed), 0.5 * zero),
                  f32(p + "c2", (embed,), 0.5 * zero)]
        h = nodes[-1].output[0]
    return model(nodes, [vi("x", ["B", tokens, embed])], [vi(h, ["B", tokens, embed])], inits)


def tokens(seed, batch=2):
    return {"x": np.random.default_rng(seed).standard_normal((batch, 5, 8)).astype(np.float32)}


def test_transformer_residuals_score_along_the_last_axis_and_remove_exactly():
    m = layers(zero_mlp_of=0)
    before = m.SerializeToString()
    blocks = find_blocks_onnx(m)
    assert [b.name for b in blocks] == ["l0.attn_residual", "l0.mlp_residual", "l1.attn_residual",
                                        "l1.mlp_residual"]
    assert all(b.axis == 2 and b.shape == (1, 5, 8) for b in blocks)
    cal = [tokens(0), tokens(1)]
    report = block_report_onnx(m, cal)
    assert report.names()[0] == "l0.mlp_residual" and report.entries[0].score == 0.0
    # Block Influence by hand for one block: cosine over the channel (last) axis of every token
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.extend([onnx.ValueInfoProto(name="l1.h1")])
    per_token = []
    for x in cal:
        b, a = run_onnx(probe, x)  # y, then x of the block
        per_token += list(1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
    assert report["l1.mlp_residual"].score == pytest.approx(np.mean(per_token), rel=1e-6)
    slim = remove_blocks_onnx(m, report, k=1)
    # the residual Add, and its branch: LayerNorm, MatMul, bias Add, Relu, MatMul, bias Add
    assert adds(slim) == adds(m) - 3 and len(slim.graph.node) == len(m.graph.node) - 7
    assert len(slim.graph.initializer) == len(m.graph.initializer) - 6
    for x in cal:
        assert max_diff(run_onnx(m, x), run_onnx(slim, x)) <= 1e-5
    assert m.SerializeToString() == before, "the caller's ModelProto changed"


def test_handbuilt_transformer_block_and_graph_output_blocks():
    m = transformer_block()
    blocks = find_blocks_onnx(m)
    assert [b.name for b in blocks] == ["residual1", "residual2"] and all(b.axis == 2 for b in blocks)
    assert "shape" in blocks[0].nodes, "Shape(x) belongs to the attention branch"
    slim = remove_blocks_onnx(m, ["residual1", "residual2"])  # y is a graph output: an Identity keeps it
    assert [(node.op_type, node.name) for node in slim.graph.node] == [("Identity", "residual2")]
    assert not slim.graph.initializer
    x = {"x": np.random.default_rng(0).standard_normal((1, 6, 16)).astype(np.float32)}
    assert max_diff(run_onnx(slim, x), [x["x"]]) == 0.0
    for method in ("cosine", "loss"):
        assert len(block_report_onnx(m, method=method)) == 2


def test_torch_transformer_export_has_two_blocks_per_layer(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    enc = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    path = tmp_path / "encoder.onnx"
    torch.onnx.export(enc, (torch.randn(2, 5, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    blocks = find_blocks_onnx(path)
    assert [b.name for b in blocks] == ["/layers.0/Add", "/layers.0/Add_1", "/layers.1/Add", "/layers.1/Add_1"]
    assert all(b.axis == 2 and b.shape == (2, 5, 16) for b in blocks)
    assert "MatMul" in blocks[0].op_types and "Softmax" in blocks[0].op_types, "attention, then MLP"
    slim = remove_blocks_onnx(path, block_report_onnx(path, method="loss"), k=2)
    assert adds(slim) < adds(onnx.load(str(path)))


def nested(leak=False):
    """``ra -> inner = ra + conv(relu(conv(ra)))`` inside ``outer = ra + conv(inner)``; ``leak`` makes a branch
    value a graph output (then nothing is a block)."""
    nodes = [n("Conv", ["x", "w0"], ["a"], name="stem"), n("Relu", ["a"], ["ra"], name="stem.act"),
             n("Conv", ["ra", "w1"], ["b1"], pads=[1, 1, 1, 1], name="c1"), n("Relu", ["b1"], ["rb1"], name="act"),
             n("Conv", ["rb1", "w2"], ["b2"], pads=[1, 1, 1, 1], name="c2"),
             n("Add", ["b2", "ra"], ["inner"], name="inner"), n("Conv", ["inner", "w3"], ["b3"], name="c3"),
             n("Add", ["ra", "b3"], ["outer"], name="outer"), n("Relu", ["outer"], ["y"], name="out.act")]
    inits = [f32("w0", (4, 3, 1, 1)), f32("w1", (4, 4, 3, 3)), f32("w2", (4, 4, 3, 3)), f32("w3", (4, 4, 1, 1))]
    outs = [vi("y", ["N", 4, 8, 8])] + ([vi("rb1", ["N", 4, 8, 8])] if leak else [])
    return model(nodes, [vi("x", ["N", 3, 8, 8])], outs, inits)


def test_nested_blocks_and_leaky_branches():
    m = nested()
    assert [b.name for b in find_blocks_onnx(m)] == ["outer"], "the outermost block wins"
    assert block_report_onnx(m, blocks=["inner"]).names() == ["inner"], "a nested block can be named"
    for call in (lambda: block_report_onnx(m, blocks=["inner", "outer"]),
                 lambda: remove_blocks_onnx(m, ["inner", "outer"])):
        with pytest.raises(InvalidArgumentError, match="'inner' lies inside block 'outer'"):
            call()
    slim = remove_blocks_onnx(m, ["inner"])
    assert [node.name for node in slim.graph.node] == ["stem", "stem.act", "c3", "outer", "out.act"]
    assert slim.graph.node[2].input[0] == "ra" and {t.name for t in slim.graph.initializer} == {"w0", "w3"}
    leaky = nested(leak=True)
    assert find_blocks_onnx(leaky) == ()
    with pytest.raises(PlanError, match="no residual block"):
        block_report_onnx(leaky)
    with pytest.raises(PlanError, match="'rb1' is a graph output"):
        remove_blocks_onnx(leaky, ["inner"])


def test_bad_inputs_raise_typed_errors_and_leave_the_file_alone(resnet):
    path, net = resnet["plain"]
    data = path.read_bytes()
    report = block_report_onnx(path, images(0), max_batches=1)
    bad = [
        (lambda: remove_blocks_onnx(path, report, k=6), InvalidArgumentError, "k=6 but only 5 blocks"),
        (lambda: remove_blocks_onnx(path, report, k=-1), InvalidArgumentError, "non-negative"),
        (lambda: remove_blocks_onnx(path, report), InvalidArgumentError, "k is required"),
        (lambda: remove_blocks_onnx(path, ["/nope/Add"]), InvalidArgumentError, "no node named '/nope/Add'"),
        (lambda: remove_blocks_onnx(path, [PLAIN[0]] * 2), InvalidArgumentError, "named twice"),
        (lambda: remove_blocks_onnx(path, ["/layer2/layer2.0/Add"]), PlanError, "not a residual x \\+ f\\(x\\)"),
        (lambda: remove_blocks_onnx(path, ["/relu/Relu"]), PlanError, "not an Add"),
        (lambda: remove_blocks_onnx(path, block_report(net, torch.randn(1, 3, 64, 64)), k=1),
         InvalidArgumentError, "PyTorch modules"),
        (lambda: block_report_onnx(path, method="taylor"), InvalidArgumentError, "method must be one of"),
        (lambda: block_report_onnx(path, []), InvalidArgumentError, "calibration data is empty"),
        (lambda: block_report_onnx(path, [{"input": 1}]), InvalidArgumentError, "inputs name \\['input'\\]"),
        (lambda: block_report_onnx(path, images(0), max_batches=0), InvalidArgumentError, "max_batches"),
        (lambda: block_report_onnx(path, [images(0), {"x": np.zeros((1, 3, 32, 32), np.float32)}]),
         InvalidArgumentError, "does not run on calibration batch 1"),
        (lambda: block_report_onnx(str(path) + ".missing"), CaptureError, "no such ONNX file"),
    ]
    for call, error, message in bad:
        with pytest.raises(error, match=message):
            call()
    assert path.read_bytes() == data


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphprune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_cli_ranks_removes_and_writes(resnet, tmp_path):
    path, _ = resnet["zeroed"]
    data = path.read_bytes()
    out, rep = tmp_path / "shallow.onnx", tmp_path / "report.json"
    res = cli("blocks", str(path), "--remove", "2", "-o", str(out), "--report", str(rep))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    rows = [line for line in lines if line.strip()[:1].isdigit()]
    assert len(rows) == 5 and ZEROED in rows[0] and rows[0].split()[1] == "0" and "removed" in rows[1]
    assert any(line.startswith("nodes") and "(Add 8 -> 6" in line for line in lines)
    slim = onnx.load(str(out))
    onnx.checker.check_model(slim, full_check=True)
    assert adds(slim) == 6
    assert BlockReport.from_dict(json.loads(rep.read_text())).names()[0] == ZEROED
    assert path.read_bytes() == data


def test_cli_errors_are_one_line_and_write_nothing(resnet, tmp_path, capsys):
    path, _ = resnet["plain"]
    data = path.read_bytes()
    out = tmp_path / "o.onnx"
    for args, message in [(["--remove", "7", "-o", str(out)], "k=7 but only 5 blocks"),
                          (["--remove", "1", "--method", "mse", "-o", str(out)], "method must be one of"),
                          (["-o", str(out)], "-o is only written with --remove"),
                          (["--remove", "1", "-o", str(path)], "names the input file"),
                          (["--model", "torchvision:resnet18"], "not both")]:
        assert main(["blocks", str(path), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("graphprune: error:") and message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir()) and path.read_bytes() == data


def test_cli_torch_model(tmp_path, capsys):
    out = tmp_path / "shallow.pt"
    assert main(["blocks", "--model", "torchvision:resnet18", "--remove", "1", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "BasicBlock" in text and "removed" in text
    slim = torch.load(out, weights_only=False)
    assert sum(isinstance(m, torch.nn.Identity) for m in slim.modules()) == 1
