"""A tiny run of benchmarks/layerfold.py: BN folding alone keeps accuracy exactly,
no rewrite adds layers or MACs, and the markdown page has its tables."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

layerfold = pytest.importorskip("layerfold")


@pytest.fixture(scope="module")
def result():
    return layerfold.run_benchmark(epochs=5, n_train=320, ks=(0, 1), block_ks=(1,), forced=False, rounds=1,
                                   threads=1, train_threads=1)


def test_bn_folding_alone_keeps_accuracy_and_size(result):
    assert result["dense_acc"] > 0.3  # trained enough that equal accuracy means something
    k0 = next(r for r in result["rows"] if not r.sites)
    assert k0.acc == result["dense_acc"]
    assert k0.depth[1] <= k0.depth[0] and k0.macs[1] <= k0.macs[0]
    assert all(s.kind == "bn" for s in k0.plan.folds) and k0.plan.folds


def test_rows_never_deepen_and_are_timed(result):
    rows = result["rows"] + result["block_rows"]
    assert [len(r.sites) for r in result["rows"]] == [0, 1]
    for r in rows:
        assert r.depth[1] <= r.depth[0]
        assert set(r.latency) == set(layerfold.BATCHES) and all(t > 0 for pair in r.latency.values() for t in pair)
        assert 0.0 <= r.acc <= 1.0 and 0.0 <= r.acc_ft <= 1.0
    block = result["block_rows"][0]
    assert block.depth[1] < block.depth[0] and block.macs[1] < block.macs[0]
    assert block.sites[0] == result["blocks"]["cosine"].names()[0]


def test_markdown_is_written(result, tmp_path):
    text = layerfold.markdown(result, "python benchmarks/layerfold.py --tiny")
    path = tmp_path / "layerfold.md"
    path.write_text(text)
    written = path.read_text()
    assert written.startswith(layerfold.TITLE)
    for part in (layerfold.FOLD_HEADER, layerfold.BLOCK_HEADER, "## Reading", "`python benchmarks/layerfold.py --tiny`",
                 "onnxruntime "):
        assert part in written
