"""The IR keeps use-def itself; lint() catches broken invariants."""

import pytest

from graphprune.errors import IRLintError
from graphprune.ir import Graph


def small_graph():
    g = Graph()
    x = g.add_input("x", (1, 3, 8, 8))
    w = g.add_param("conv.weight", (4, 3, 3, 3))
    conv = g.add_node("conv", [x, w, None], [(1, 4, 8, 8)], attrs={"groups": 1})
    relu = g.add_node("relu", [conv.outputs[0]], [(1, 4, 8, 8)])
    g.set_outputs(relu.outputs)
    return g, x, w, conv, relu


def test_use_def_is_maintained():
    g, x, w, conv, relu = small_graph()
    assert x.uses == [(conv, 0)]
    assert w.uses == [(conv, 1)]
    assert conv.outputs[0].producer is conv
    assert conv.outputs[0].uses == [(relu, 0)]
    g.lint()


def test_param_is_created_once():
    g = Graph()
    assert g.add_param("a.weight", (2, 2)) is g.add_param("a.weight", (2, 2))


def test_names_are_unique():
    g = Graph()
    x = g.add_input("x", (1,))
    a = g.add_node("relu", [x], [(1,)], name="n")
    b = g.add_node("relu", [a.outputs[0]], [(1,)], name="n")
    assert a.name != b.name


def test_lint_catches_stale_use():
    g, x, w, conv, relu = small_graph()
    x.uses.append((relu, 0))
    with pytest.raises(IRLintError, match="does not read it"):
        g.lint()


def test_lint_catches_read_before_produce():
    g, x, w, conv, relu = small_graph()
    g.nodes.reverse()
    with pytest.raises(IRLintError, match="before it is produced"):
        g.lint()


def test_lint_catches_wrong_producer():
    g, x, w, conv, relu = small_graph()
    conv.outputs[0].producer = relu
    with pytest.raises(IRLintError, match="producer"):
        g.lint()


def test_ir_imports_no_framework():
    import subprocess
    import sys

    code = ("import sys; import graphprune.ir, graphprune.coupling, graphprune.scoring, graphprune.planning; "
            "bad = [m for m in ('torch', 'onnx') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    # importing the subpackages runs graphprune/__init__, which imports torch for the API;
    # so check the framework-free modules by loading them without the package __init__.
    check = (
        "import importlib.util, sys, types, pathlib\n"
        "root = pathlib.Path('graphprune')\n"
        "pkg = types.ModuleType('graphprune'); pkg.__path__ = [str(root)]; sys.modules['graphprune'] = pkg\n"
        "for sub in ('ir', 'coupling', 'scoring', 'planning'):\n"
        "    importlib.import_module('graphprune.' + sub)\n"
        "bad = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "sys.exit(f'framework imported: {bad}' if bad else 0)\n"
    )
    del code
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout


def _residual_norm_graph(branch: bool):
    """x -> linear -> dropout -> add(x) -> layer_norm; ``branch``: the linear's output is read twice."""
    g = Graph()
    x = g.add_input("x", (2, 8))
    lin = g.add_node("linear", [x, g.add_param("fc.weight", (8, 8)), g.add_param("fc.bias", (8,))], [(2, 8)])
    drop = g.add_node("dropout", [lin.outputs[0]], [(2, 8)])
    add = g.add_node("add", [drop.outputs[0], x], [(2, 8)])
    ln = g.add_node("layer_norm", [add.outputs[0], g.add_param("ln.weight", (8,)), g.add_param("ln.bias", (8,))],
                    [(2, 8)])
    outs = ln.outputs + ([g.add_node("relu", [lin.outputs[0]], [(2, 8)]).outputs[0]] if branch else [])
    g.set_outputs(outs)
    g.lint()
    return g


def test_normalised_sums_follow_single_use_additions_only():
    from graphprune.ir.query import normalised_sums

    assert normalised_sums(_residual_norm_graph(branch=False)) == {"fc.weight": "ln.weight"}
    assert normalised_sums(_residual_norm_graph(branch=True)) == {}
    g, *_ = small_graph()  # conv -> relu: no norm
    assert normalised_sums(g) == {}
