"""The command line: prune, inspect, and one-line errors."""

import subprocess
import sys

import torch


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphprune", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_prune_prints_figures_and_writes_a_loadable_model(tmp_path):
    out = tmp_path / "slim.pt"
    res = cli("prune", "--model", "torchvision:resnet18", "--ratio", "0.5", "--out", str(out))
    assert res.returncode == 0, res.stderr
    for word in ("params", "MACs", "oracle", "wrote"):
        assert word in res.stdout
    slim = torch.load(out, weights_only=False)
    assert slim.layer1[0].conv1.out_channels == 32
    assert (tmp_path / "slim.plan.json").read_text().startswith("{")


def test_inspect_lists_groups():
    res = cli("inspect", "--model", "torchvision:squeezenet1_1")
    assert res.returncode == 0, res.stderr
    assert "groups" in res.stdout.splitlines()[0]
    assert len(res.stdout.splitlines()) > 5


def test_errors_are_one_line():
    res = cli("inspect", "--model", "torchvision:not_a_model")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("graphprune: error:") and "not_a_model" in res.stderr
    res = cli("prune", "--model", "resnet18", "--ratio", "1.5")
    assert res.returncode == 2 and "torchvision:" in res.stderr and "Traceback" not in res.stderr
