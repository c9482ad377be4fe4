"""ONNX written by another framework: a scikit-learn MLP converted offline by
skl2onnx (trained on the digits dataset that scikit-learn ships)."""

import numpy as np
import onnx
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier

import graphprune as gp


def test_sklearn_mlp_prunes_and_verifies():
    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=300, random_state=0).fit(X, y)
    m = to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    feeds = {m.graph.input[0].name: X[:100]}
    plan = gp.plan_onnx(m, ratio=0.5, inputs=feeds)
    assert sorted(g.width for g in plan.groups) == [32, 64]
    assert any("ArgMax" in b for b in plan.meta["barriers"]), "label head is reported as a barrier"
    slim = gp.apply_onnx(m, plan, inputs=feeds)
    onnx.checker.check_model(slim, full_check=True)
    report = gp.verify_onnx(m, slim, plan, feeds)
    assert report.exact and report.max_abs_diff <= report.tolerance
    assert gp.count_params_onnx(slim) < 0.6 * gp.count_params_onnx(m)
