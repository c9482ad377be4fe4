"""The recording frontend (one eager forward under a TorchFunctionMode):
differential against torch.export on the Hugging Face configs, its refusals
(data-dependent control flow, aliased in-place writes) and the fallbacks."""

import pytest
import torch
import torch.nn as nn
import transformers
from helpers import assert_untouched, snapshot
from test_transformers import HEAD_MODELS, inputs_for

import graphprune as gp
from graphprune.apply.torch_apply import _aliases
from graphprune.capture.torch_export import capture_export, capture_record
from graphprune.capture.torch_record import RecordError
from graphprune.coupling.groups import couple


def signature(graph, prunable_only=False, alias=None):
    """Every group as (kind, width, lossy, sorted members) - independent of group order and ids;
    ``alias`` maps a tied parameter's names to one."""
    alias = alias or {}
    groups = [g for g in couple(graph).groups if g.n_prunable or not prunable_only]
    return sorted((g.kind, g.width, g.lossy, tuple(g.prunable),
                   tuple(sorted((alias.get(m.param, m.param), m.axis, m.role, m.indices, m.units)
                                for m in g.members)))
                  for g in groups)


@pytest.mark.parametrize("build", HEAD_MODELS, ids=lambda b: b.__name__)
def test_record_finds_the_groups_export_finds(build):
    torch.manual_seed(0)
    model = build()[0].eval()
    x = inputs_for(model)
    snap = snapshot(model)
    assert signature(capture_record(model, x)) == signature(capture_export(model, x))
    assert_untouched(model, snap)


def test_hf_models_are_captured_by_recording_and_pruned_exactly():
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                   intermediate_size=128, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = {"input_ids": torch.randint(0, 100, (2, 8))}
    plan = gp.plan(model, ids, ratio=0.5, heads=0.5)
    assert plan.meta["capture"] == "record"
    report = gp.verify(model, gp.apply(model, plan), plan, ids)
    assert report.exact and report.max_abs_diff < 1e-4


class Branchy(nn.Module):
    """Python control flow on a traced value: the recorder refuses, export cannot decide it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        if h.mean() > 0:
            h = h * 2
        return self.b(h)


class AliasedWrite(nn.Module):
    """An in-place write through a view: the recorder refuses, export handles it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[0] > 0:  # a shape branch: fx cannot trace it
            h = self.a(x)
            v = h.view(-1)
            v.mul_(2.0)
            return self.b(h)
        return x


class Indexing(nn.Module):
    """Slices, None, Ellipsis, iteration and r-operators on traced tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        if x.dim() < 2:
            return x
        h = self.a(x)[:, None, ...][:, 0]
        rows = [r for r in h]
        h = torch.stack(rows) if len(rows) > 1 else rows[0][None]
        return self.b(1.0 - h[..., :8] * 0.5)


def test_data_dependent_branch_is_refused_not_burned_in():
    model = Branchy().eval()
    with pytest.raises(RecordError, match="data-dependent"):
        capture_record(model, torch.randn(2, 4))


def test_aliased_inplace_write_falls_back_to_export():
    model = AliasedWrite().eval()
    x = torch.randn(2, 4)
    with pytest.raises(RecordError, match="in-place"):
        capture_record(model, x)
    plan = gp.plan(model, x, ratio=0.5)
    assert plan.meta["capture"] == "export"
    gp.verify(model, gp.apply(model, plan), plan, x)


def test_indexing_and_iteration_are_recorded():
    model = Indexing().eval()
    x = torch.randn(3, 4)
    graph = capture_record(model, x)
    ops = [n.op for n in graph.nodes]
    assert "aten:unbind" in ops and "aten:stack" in ops  # no rule: barriers, never guessed through
    plan = gp.plan(model, x, ratio=0.5)
    assert plan.meta["capture"] == "record"
    gp.verify(model, gp.apply(model, plan), plan, x)


class MaskBranch(nn.Module):
    """Branches on an integer mask (as Hugging Face's mask code does) and on a float input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x, mask):
        h = self.a(x)
        if not bool((mask == 1).all()):  # integer input values: read as the forward reads them
            h = h * mask[..., None]
        return self.b(h)


def test_integer_input_reads_are_recorded_float_reads_refused():
    from graphprune.capture.torch_fx import as_args
    from graphprune.capture.torch_record import record

    model = MaskBranch().eval()
    x, mask = torch.randn(2, 4), torch.tensor([1, 0])
    args, kwargs = as_args((x, mask))
    assert record(model, args, kwargs).input_reads == ["__bool__"]
    plan = gp.plan(model, (x, mask), ratio=0.5)
    assert plan.meta["capture"] == "record"
    gp.verify(model, gp.apply(model, plan), plan, (x, mask))
    with pytest.raises(RecordError, match="floating-point data"):
        capture_record(model, (x, mask.float()))


_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)
MORE_HF = {
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(num_key_value_heads=2, head_dim=16,
                                                                            **_SMALL)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(num_key_value_heads=2, head_dim=16,
                                                                            **_SMALL)),
    "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=100,
        word_embed_proj_dim=64)),
    "roberta": lambda: transformers.RobertaModel(transformers.RobertaConfig(**_SMALL)),
    "distilbert": lambda: transformers.DistilBertModel(transformers.DistilBertConfig(
        dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=100)),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**_SMALL)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **_SMALL)),
}


@pytest.mark.parametrize("name", sorted(MORE_HF))
def test_more_hf_families_record_like_export_and_prune_exactly(name):
    torch.manual_seed(0)
    model = MORE_HF[name]().eval()
    ids = {"input_ids": torch.randint(0, 100, (2, 8))}
    snap = snapshot(model)
    # the fixed groups may differ (export takes the traced branches of the mask code), and a tied
    # LM head is named by either of its names
    alias = _aliases(model)
    assert signature(capture_record(model, ids), True, alias) == signature(capture_export(model, ids), True, alias)
    plan = gp.plan(model, ids, ratio=0.5, heads=0.5)
    assert plan.meta["capture"] == "record" and any(g.kind == "head" for g in plan.groups)
    report = gp.verify(model, gp.apply(model, plan), plan, ids)
    assert report.exact
    assert_untouched(model, snap)


class BranchyRMS(nn.Module):
    """nn.RMSNorm behind a shape branch (fx fails): recorded and exported as a lossy norm."""

    def __init__(self):
        super().__init__()
        self.a, self.n, self.b = nn.Linear(8, 16), nn.RMSNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        if x.shape[0] > 0:
            x = self.n(self.a(x))
        return self.b(x)


@pytest.mark.parametrize("capture", [capture_record, capture_export], ids=["record", "export"])
def test_rms_norm_is_a_lossy_norm_when_recorded_or_exported(capture):
    torch.manual_seed(0)
    model = BranchyRMS().eval()
    groups = [g for g in couple(capture(model, torch.randn(3, 8))).groups if g.n_prunable]
    assert [(g.width, g.lossy) for g in groups] == [(16, True)]
