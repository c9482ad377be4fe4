"""Removable residual blocks: Block Influence (1 - cosine) and loss-increase
scores, removal from nn.Sequential (nn.Identity) and from Hugging Face decoder
stacks (entries deleted, config and layer_idx renumbered, save/reload equal)."""

import json

import pytest
import torch
import torch.nn as nn
import torchvision
import transformers
from helpers import assert_untouched, snapshot

from graphprune.errors import InvalidArgumentError, PlanError
from graphprune.layerfold.blocks import BlockReport, block_report, remove_blocks

PLAIN = ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]  # BasicBlocks without downsample


def resnet(identity_block=None):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    if identity_block is not None:  # zero the residual branch: relu(0 + x) == x for x >= 0
        bn2 = model.get_submodule(identity_block).bn2
        with torch.no_grad():
            bn2.weight.zero_()
            bn2.bias.zero_()
    return model


def images(seed=0):
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def llama(layers=4, cls=transformers.LlamaConfig, model_cls=transformers.LlamaForCausalLM):
    torch.manual_seed(0)
    cfg = cls(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=100)
    return model_cls(cfg).eval()


def tokens(seed=0):
    return {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))}


def test_resnet18_report_ranks_plain_blocks_and_removal_runs():
    model = resnet().train()
    snap, text = snapshot(model), str(model)
    report = block_report(model, [images(0), images(1)])
    assert sorted(report.names()) == sorted(PLAIN)
    scores = [e.score for e in report]
    assert scores == sorted(scores) and all(0 < s < 1 for s in scores)
    assert all(e.in_shape == e.out_shape and e.container_kind == "sequential" for e in report)
    slim = remove_blocks(model, report, k=2, example_inputs=images())
    assert_untouched(model, snap)
    assert str(model) == text and model.training
    blocks = [m for m in slim.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert len(blocks) == 8 - 2
    for name in report.names()[:2]:
        assert isinstance(slim.get_submodule(name), nn.Identity)
    with torch.no_grad():
        assert slim.eval()(images()).shape == model.eval()(images()).shape == (2, 1000)


def test_identity_block_scores_zero_ranks_first_and_removal_is_exact():
    model = resnet(identity_block="layer2.1")
    for method in ("cosine", "loss"):
        report = block_report(model, images(), method=method)
        assert report.names()[0] == "layer2.1" and report[0].score == 0.0
        assert all(e.score > 1e-6 for e in report.entries[1:])
    slim = remove_blocks(model, report, k=1)
    with torch.no_grad():
        diff = (slim(images(3)) - model(images(3))).abs().max()
    assert diff <= 1e-5


def test_loss_method_with_own_loss_fn_and_one_shot_iterable():
    model = resnet()
    report = block_report(model, (images(i) for i in range(2)), method="loss",
                          loss_fn=lambda out: out.pow(2).mean())
    with torch.no_grad():
        base = sum(float(model(images(i)).pow(2).mean()) for i in range(2)) / 2
    assert report.baseline == pytest.approx(base, rel=1e-6)
    assert sorted(report.names()) == sorted(PLAIN) and len(report) == 5


def test_downsample_block_is_refused_with_its_name():
    model = resnet()
    with pytest.raises(PlanError, match=r"'layer2\.0'.*downsample"):
        remove_blocks(model, ["layer2.0"])
    with pytest.raises(PlanError, match=r"'layer2\.0' changes the shape"):
        block_report(model, images(), blocks=["layer2.0", "layer1.0"])


def test_explicit_blocks_and_bad_names():
    model = resnet()
    report = block_report(model, images(), blocks=["layer1.1", "layer3.1"])
    assert sorted(report.names()) == ["layer1.1", "layer3.1"]
    with pytest.raises(InvalidArgumentError, match="no module named 'layer9.0'"):
        block_report(model, images(), blocks=["layer9.0"])
    with pytest.raises(InvalidArgumentError, match="no module named 'layer9.0'"):
        remove_blocks(model, ["layer9.0"])
    with pytest.raises(PlanError, match="'layer1.0.conv1' is not an entry"):
        remove_blocks(model, ["layer1.0.conv1"])
    with pytest.raises(InvalidArgumentError, match="k=6 but only 5 blocks"):
        remove_blocks(model, block_report(model, images()), k=6)
    with pytest.raises(InvalidArgumentError, match="k is required"):
        remove_blocks(model, report)
    with pytest.raises(InvalidArgumentError, match="method"):
        block_report(model, images(), method="angle")
    with pytest.raises(InvalidArgumentError, match="does not fit"):
        block_report(model, torch.randn(2, 5, 64, 64))


def test_report_round_trips_through_json():
    report = block_report(resnet(), images())
    assert BlockReport.from_dict(json.loads(report.to_json())) == report


def test_llama_layer_removal_config_cache_and_reload(tmp_path):
    model = llama()
    snap, ids = snapshot(model), tokens()
    report = block_report(model, [tokens(0), tokens(1)])
    assert sorted(report.names()) == [f"model.layers.{i}" for i in range(4)]
    assert all(e.container_kind == "modulelist" and e.in_shape == (2, 8, 64) for e in report)
    assert [e.score for e in report] == sorted(e.score for e in report)
    slim = remove_blocks(model, report, k=1, example_inputs=ids)
    assert_untouched(model, snap)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert len(slim.model.layers) == 3 and slim.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in slim.model.layers] == [0, 1, 2]
    with torch.no_grad():
        cached = slim(**ids)
        plain = slim(**ids, use_cache=False)
        full = model(**ids).logits
    assert cached.logits.shape == plain.logits.shape == full.shape
    assert len(cached.past_key_values.layers) == 3
    assert torch.allclose(cached.logits, plain.logits, atol=1e-5)
    slim.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.allclose(again(**ids).logits, cached.logits, atol=1e-5)


def test_removed_layer_is_the_one_named_and_layer_types_follow():
    """Qwen2 has config.layer_types: it is sliced; the kept layers are the originals."""
    model = llama(cls=transformers.Qwen2Config, model_cls=transformers.Qwen2ForCausalLM)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "full_attention"]
    kept_weight = model.model.layers[2].mlp.up_proj.weight
    slim = remove_blocks(model, ["model.layers.1"])
    assert slim.config.layer_types == ["full_attention"] * 3 and slim.config.num_hidden_layers == 3
    assert torch.equal(slim.model.layers[1].mlp.up_proj.weight, kept_weight)
    assert [layer.self_attn.layer_idx for layer in slim.model.layers] == [0, 1, 2]
    with torch.no_grad():
        assert slim(**tokens()).logits.shape == (2, 8, 100)
