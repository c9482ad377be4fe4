"""MACs and parameter budgets: the smallest uniform ratio that meets them."""

import pytest
import torch
import torchvision
from helpers import assert_untouched, snapshot
from onnx_graphs import conv_net

import graphprune as gp
from graphprune.zoo import lively_init


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return lively_init(torchvision.models.resnet18().eval()), torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("target", [0.5, 0.25])
def test_macs_budget_is_met_within_two_percent(resnet, target):
    model, x = resnet
    plan = gp.plan(model, x, macs=target, ignore=[model.fc])
    slim = gp.apply(model, plan)
    kept = gp.count_macs(slim, x) / gp.count_macs(model, x)
    assert target - 0.02 <= kept <= target
    assert plan.meta["budget"] == {"macs": target}
    gp.verify(model, slim, plan, x)


def test_params_budget(resnet):
    model, x = resnet
    slim = gp.prune(model, x, params=0.4, ignore=[model.fc])
    kept = gp.count_params(slim) / gp.count_params(model)
    assert 0.38 <= kept <= 0.4


def test_onnx_macs_budget():
    m = conv_net()
    plan = gp.plan_onnx(m, macs=0.5)
    slim = gp.apply_onnx(m, plan)
    assert gp.count_macs_onnx(slim) <= 0.5 * gp.count_macs_onnx(m)
    gp.verify_onnx(m, slim, plan)


def test_bad_budgets(resnet):
    model, x = resnet
    snap = snapshot(model)
    with pytest.raises(gp.InvalidArgumentError, match="one budget"):
        gp.plan(model, x, ratio=0.3, macs=0.5)
    for bad in (0, 1.5, "half", True):
        with pytest.raises(gp.InvalidArgumentError, match="macs must be"):
            gp.plan(model, x, macs=bad)
    with pytest.raises(gp.PlanError, match="cannot be met") as err:
        gp.plan(model, x, macs=0.5, ignore=[""])  # everything ignored
    assert "\n" not in str(err.value)
    assert_untouched(model, snap)


def test_cli_macs_budget_on_onnx(tmp_path, capsys):
    import onnx

    from graphprune.cli import main

    src = tmp_path / "net.onnx"
    onnx.save(conv_net(), str(src))
    assert main(["prune", str(src), "--macs", "0.5", "-o", str(tmp_path / "slim.onnx")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("MACs"))
    kept = float(line.split("(")[1].split("%")[0]) / 100
    assert kept <= 0.5


def test_iterative_pruning_meets_the_budget_of_the_original(resnet):
    model, x = resnet
    snap = snapshot(model)
    slim = gp.prune(model, x, macs=0.4, ignore=[model.fc], steps=3, importance="l1", allocation="global")
    assert_untouched(model, snap)
    kept = gp.count_macs(slim, x) / gp.count_macs(model, x)
    assert 0.38 <= kept <= 0.4
    with pytest.raises(gp.InvalidArgumentError, match="steps"):
        gp.prune(model, x, steps=0)


def test_latency_budget_uses_a_cached_per_layer_table(resnet, tmp_path, monkeypatch):
    from graphprune import latency

    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "_MEMORY", {})
    model, x = resnet
    plan = gp.plan(model, x, latency=0.5, ignore=[model.fc])
    assert plan.meta["budget"] == {"latency": 0.5} and plan.meta["latency_kept_estimate"] <= 0.5
    assert (tmp_path / "latency.json").exists()
    gp.verify(model, gp.apply(model, plan), plan, x)
    table = latency.LatencyModel()
    coupling = gp.analyze(model, x)
    assert table(coupling.graph) > 0 and table.measured == 0, "the dense layers were timed during planning"
    with pytest.raises(gp.InvalidArgumentError, match="latency must be"):
        gp.plan(model, x, latency=0)
    with pytest.raises(gp.InvalidArgumentError, match="iterative"):
        gp.prune(model, x, latency=0.5, steps=2)


def _bert_with_dead_heads():
    """A 2-layer BERT whose layer 0 has three dead heads (value rows and
    output-projection columns zero): a global head ranking takes all three."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=100)
    model = transformers.BertModel(cfg).eval()
    att = model.encoder.layer[0].attention
    with torch.no_grad():
        for h in (0, 1, 3):
            cols = slice(16 * h, 16 * (h + 1))
            for lin in (att.self.query, att.self.key, att.self.value):
                lin.weight[cols] = 0
                lin.bias[cols] = 0
            att.output.dense.weight[:, cols] = 0
    return model, {"input_ids": torch.randint(0, 100, (2, 6))}


@pytest.mark.parametrize("importance", ["l2", "reconstruction"])
def test_global_head_allocation_ranks_heads_across_layers(importance):
    model, x = _bert_with_dead_heads()
    cal = [{"input_ids": torch.randint(0, 100, (4, 6))} for _ in range(2)]
    kw = {"calibration": cal} if importance != "l2" else {}
    glob = gp.plan(model, x, heads=3 / 8, allocation="global", importance=importance, **kw)
    kept = {g.id: g.kept_units for g in glob.groups if g.kind == "head"}
    assert list(kept.values()) == [1]            # all three dead heads of layer 0, none of layer 1
    removed = {i // 16 for g in glob.groups for m in g.members
               if m.name == "encoder.layer.0.attention.self.value.weight" for i in m.removed}
    assert removed == {0, 1, 3}
    gp.verify(model, gp.apply(model, glob), glob, x)
    if importance == "l2":   # every layer keeps a head whatever the share
        everything = gp.plan(model, x, heads=0.99, allocation="global")
        assert sorted(g.kept_units for g in everything.groups if g.kind == "head") == [1, 1]
