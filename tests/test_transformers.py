"""Hugging Face models from small configs (nothing downloaded): MLP channels
pruned exactly through torch.export capture, config rewritten, and
save_pretrained -> from_pretrained gives back the same outputs."""

import pytest
import torch
import transformers
from helpers import assert_untouched, snapshot

import graphprune as gp


def bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=100)
    return transformers.BertModel(cfg), "intermediate_size"


def llama():  # grouped-query attention: 8 query heads, 4 KV heads
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                   intermediate_size=128, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg), "intermediate_size"


def mistral():
    cfg = transformers.MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                     num_key_value_heads=4, intermediate_size=128, vocab_size=100)
    return transformers.MistralForCausalLM(cfg), "intermediate_size"


def qwen2():
    cfg = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, intermediate_size=128, vocab_size=100)
    return transformers.Qwen2ForCausalLM(cfg), "intermediate_size"


def llama_mha():  # 4 query heads, 4 KV heads: 3 heads left cannot be said by config (64 % 3)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=128, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg), "intermediate_size"


def vit():
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8)
    return transformers.ViTModel(cfg), "intermediate_size"


def gpt2():  # Conv1D layers, weight [in, out]
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg), "n_inner"


def logits(model, ids):
    with torch.no_grad():
        out = model(**ids) if isinstance(ids, dict) else model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def inputs_for(model):
    if isinstance(model, transformers.ViTModel):
        return {"pixel_values": torch.randn(2, 3, 32, 32)}
    return {"input_ids": torch.randint(0, 100, (2, 8))}


def heads_of(model):
    """(query heads, KV heads) of every attention layer, read from the projections."""
    from graphprune.apply.torch_apply import rewrite_head_counts

    return sorted(set(rewrite_head_counts(model).values()))


HEAD_MODELS = [bert, llama, llama_mha, mistral, qwen2, gpt2, vit]


@pytest.mark.parametrize("build", HEAD_MODELS)
@pytest.mark.parametrize("share", [0.25, 0.5])
def test_heads_and_mlp_pruned_exactly_and_reload(build, share, tmp_path):
    """Whole heads (GQA: a KV head with its query heads) and MLP channels go
    together; verify is exact, attributes and config follow, and the saved
    model comes back with the same outputs through gp.load_pretrained (and
    through from_pretrained itself when the config can describe it)."""
    torch.manual_seed(0)
    model, _ = build()
    model.eval()
    x = inputs_for(model)
    snap = snapshot(model)
    (heads0, kv0), = heads_of(model)
    plan = gp.plan(model, x, ratio=share, heads=share)
    slim = gp.apply(model, plan)
    assert_untouched(model, snap)
    head_groups = [g for g in plan.groups if g.kind == "head"]
    assert len(head_groups) == 2 and all(g.kept_units == g.width - int(share * g.width) for g in head_groups)
    report = gp.verify(model, slim, plan, x)
    assert report.exact and report.max_abs_diff <= report.tolerance
    assert logits(slim, x).shape == logits(model, x).shape
    (heads, kv), = heads_of(slim)
    assert heads < heads0 and heads // kv == heads0 // kv0  # GQA: query heads per KV head kept
    slim.save_pretrained(tmp_path)
    again = gp.load_pretrained(str(tmp_path))
    assert type(again) is type(model) and torch.allclose(logits(again, x), logits(slim, x), atol=1e-5)
    if not getattr(slim.config, "graphprune_shapes", None):
        native = type(model).from_pretrained(tmp_path).eval()
        assert torch.allclose(logits(native, x), logits(slim, x), atol=1e-5)
        assert slim.config.num_attention_heads == heads


def test_heads_budget_is_validated_and_never_empties_a_layer():
    torch.manual_seed(0)
    model, _ = llama()
    x = inputs_for(model.eval())
    with pytest.raises(gp.InvalidArgumentError, match="heads"):
        gp.plan(model, x, heads=1.0)
    plan = gp.plan(model, x, heads=0.9)  # 4 KV groups per layer: one must stay
    assert {g.kept_units for g in plan.groups} == {1} and all(g.kind == "head" for g in plan.groups)
    assert gp.plan(model, x, ratio=0.5).groups and all(g.kind == "channel" for g in gp.plan(model, x, ratio=0.5).groups)


@pytest.mark.parametrize("build", [bert, llama, mistral, qwen2, gpt2])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_mlp_pruning_is_exact_and_reloads(build, ratio, tmp_path):
    torch.manual_seed(0)
    model, key = build()
    model.eval()
    ids = torch.randint(0, 100, (2, 8))
    snap = snapshot(model)
    plan = gp.plan(model, {"input_ids": ids}, ratio=ratio)
    slim = gp.apply(model, plan)
    assert_untouched(model, snap)
    assert plan.groups and all(g.width == 128 or g.width == 256 for g in plan.groups)
    report = gp.verify(model, slim, plan, {"input_ids": ids})
    assert report.exact and report.max_abs_diff <= report.tolerance
    assert logits(slim, ids).shape == logits(model, ids).shape
    width = getattr(slim.config, key)
    assert width == plan.groups[0].kept_units < (getattr(model.config, key) or 4 * model.config.n_embd)
    slim.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(again, ids), logits(slim, ids), atol=1e-5)


@pytest.mark.parametrize("heads", [0.0, 0.25])
def test_real_pretrained_minilm(heads):
    """all-MiniLM-L6-v2 from the PyPI package: 25% of MLP channels (and of
    heads) removed, exact by the oracle, config rewritten, embeddings still
    close (the measured cosines are in benchmarks/results/minilm.md)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from minilm import embed, load, mean_cosine, sentences

    tok, model = load()
    sents = sentences(120)
    ex = dict(tok(sents[:4], padding=True, return_tensors="pt"))
    plan = gp.plan(model, ex, ratio=0.25, heads=heads)
    slim = gp.apply(model, plan)
    assert gp.verify(model, slim, plan, ex).exact
    assert slim.config.intermediate_size == 1152 and len(plan.groups) == (12 if heads else 6)
    assert {len(g.members) for g in plan.groups if g.kind == "head"} <= {7}  # q, k, v weights + biases, o columns
    if heads:
        assert {m.self.num_attention_heads for m in (layer.attention for layer in slim.encoder.layer)} == {9}
    cos = mean_cosine(embed(slim, tok, sents), embed(model, tok, sents))
    assert (0.8 if not heads else 0.7) <= cos < 1.0


def gpt2_lm():  # LM head tied to the token embedding
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), "n_inner"


def bert_mlm():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=100)
    return transformers.BertForMaskedLM(cfg), "intermediate_size"


@pytest.mark.parametrize("build", [llama, mistral, qwen2, gpt2_lm, bert_mlm])
def test_hidden_width_is_lossy_reported_and_reloads(build, tmp_path):
    """hidden= shrinks the residual stream (embeddings, norms, every projection,
    the tied LM head) in one group; the norm statistics make it lossy, which
    verify reports while the head/MLP groups stay exact."""
    torch.manual_seed(0)
    model, _ = build()
    model.eval()
    x = inputs_for(model)
    snap = snapshot(model)
    plan = gp.plan(model, x, ratio=0.25, heads=0.25, hidden=0.25)
    hidden = [g for g in plan.groups if g.kind == "hidden"]
    assert len(hidden) == 1 and hidden[0].lossy and hidden[0].kept_units == 48
    slim = gp.apply(model, plan)
    assert_untouched(model, snap)
    report = gp.verify(model, slim, plan, x)
    assert set(report.lossy_groups) == {hidden[0].id} and not report.exact
    assert report.exact_groups == len(plan.groups) - 1
    assert logits(slim, x).shape == logits(model, x).shape
    assert slim.get_input_embeddings().weight.shape[1] == 48
    if hasattr(slim, "lm_head") and model.lm_head.weight is model.get_input_embeddings().weight:
        assert slim.lm_head.weight is slim.get_input_embeddings().weight  # still tied
    slim.save_pretrained(tmp_path)
    again = gp.load_pretrained(str(tmp_path))
    assert torch.allclose(logits(again, x), logits(slim, x), atol=1e-5)


def test_hidden_stays_unless_asked():
    torch.manual_seed(0)
    model, _ = llama()
    plan = gp.plan(model.eval(), inputs_for(model), ratio=0.5, heads=0.5)
    assert plan.groups and all(g.kind != "hidden" for g in plan.groups)


def test_per_layer_widths_reload_through_the_graphprune_loader(tmp_path):
    """Global allocation gives each layer its own MLP width: config.json lists
    the shapes its fields cannot say, from_pretrained refuses (size mismatch)
    instead of loading a wrong model, gp.load_pretrained rebuilds it."""
    torch.manual_seed(0)
    model, _ = llama()
    model.eval()
    with torch.no_grad():  # make layer 1's MLP clearly weaker so the global ranking takes more of it
        model.model.layers[1].mlp.down_proj.weight.mul_(0.05)
    x = inputs_for(model)
    plan = gp.plan(model, x, ratio=0.4, allocation="global")
    slim = gp.apply(model, plan)
    widths = {layer.mlp.up_proj.out_features for layer in slim.model.layers}
    assert len(widths) == 2 and slim.config.graphprune_shapes
    slim.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="(?i)size|shape|mismatch"):
        type(model).from_pretrained(tmp_path)
    again = gp.load_pretrained(str(tmp_path))
    assert {layer.mlp.up_proj.out_features for layer in again.model.layers} == widths
    assert torch.allclose(logits(again, x), logits(slim, x), atol=1e-5)


def test_a_plan_that_breaks_grouped_query_attention_is_refused():
    """A hand-edited plan that removes one query head of a KV group (not a
    whole group) raises a one-line PlanError; the model is untouched."""
    from graphprune.planning.plan import PlanGroup, PlanMember, PruningPlan

    torch.manual_seed(0)
    model, _ = llama()  # 8 query heads of 8 dims, 4 KV heads
    model.eval()
    snap = snapshot(model)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    keep = tuple(range(8, 64))  # drops query head 0 only
    members = (PlanMember(q, 0, "out", keep, tuple(range(64))), PlanMember(o, 1, "in", keep, tuple(range(64))))
    plan = PruningPlan((PlanGroup(0, "head", 8, 7, False, members),), {})
    with pytest.raises(gp.PlanError, match="7 query heads cannot share 4 KV heads"):
        gp.apply(model, plan)
    assert_untouched(model, snap)


def test_a_model_nothing_can_capture_gets_one_line_and_stays_untouched():
    class Opaque(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow: fx cannot trace it
                return self.lin(x)
            return self.lin(x).numpy()  # and export cannot either

    model = Opaque().eval()
    snap = snapshot(model)
    with pytest.raises(gp.CaptureError) as err:
        gp.plan(model, torch.ones(2, 4), heads=0.5)
    assert "\n" not in str(err.value) and "torch.fx" in str(err.value) and "torch.export" in str(err.value)
    assert_untouched(model, snap)


def test_weight_criteria_on_meta_say_so():
    """A model built on the meta device can be captured and planned with random
    importance; a criterion that reads weights says what is missing."""
    with torch.device("meta"):
        model, _ = llama()
    x = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")}
    with pytest.raises(gp.InvalidArgumentError, match="meta device"):
        gp.plan(model, x, ratio=0.25)
    plan = gp.plan(model, x, ratio=0.25, heads=0.25, importance="random")
    assert {g.kind for g in plan.groups} == {"channel", "head"}
