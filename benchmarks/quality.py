"""One-shot pruning quality: graphprune vs Torch-Pruning on a CNN trained on
real data that ships with a PyPI package (scikit-learn's 8x8 digits).

A small residual CNN is trained (seeded) on 1500 digits and tested on the
other 297.  Each tool prunes it to the same MACs targets (graphprune with
``macs=``; Torch-Pruning's ``pruning_ratio`` is bisected until its MACs meet
the target) with each criterion; graphprune also with compensation on 256
calibration images (no labels used).  Both tools' pruned models are then
fine-tuned for one epoch (graphprune's from its least-squares compensated
model).  ``default`` is graphprune's ``importance=None`` (the reconstruction
criterion, given calibration data).  Accuracy is on the held-out digits.

Part (b), the real pretrained MiniLM beside Torch-Pruning, is
``benchmarks/minilm.py``; ``--parts cnn,minilm`` runs both here (MiniLM with
the default settings and Torch-Pruning's L2 and Taylor, writing
``--minilm-out``; about 20 minutes on 2 cores).

    python benchmarks/quality.py --out benchmarks/results/quality.md
    python benchmarks/quality.py --parts minilm --minilm-out benchmarks/results/minilm.md
"""

from __future__ import annotations

import argparse
import copy
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from common import write_text  # noqa: E402  (benchmarks/ is not a package)
from sklearn.datasets import load_digits

import graphprune as gp


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class DigitsNet(nn.Module):
    def __init__(self, w=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = nn.Sequential(Block(w), Block(w))
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * w), nn.ReLU())
        self.layer2 = nn.Sequential(Block(2 * w), Block(2 * w))
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def data():
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    return (X[:1500], y[:1500]), (X[1500:], y[1500:])


def train(model, train_set, epochs, lr=3e-3, seed=0):
    torch.manual_seed(seed)
    X, y = train_set
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(X)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, test_set):
    X, y = test_set
    return float((model.eval()(X).argmax(1) == y).float().mean())


def tp_prune(model, x, target, importance, calibration=None, global_pruning=False):
    """Torch-Pruning at the ratio whose MACs meet ``target`` (bisection).

    Gradient criteria (Taylor, Hessian) get the same label-free loss on the
    same calibration batches graphprune uses, accumulated before each step.
    """
    import torch_pruning as tp

    from graphprune.calibration import default_loss

    dense = gp.count_macs(model, x)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(m, x, importance=importance, pruning_ratio=mid, ignored_layers=[m.fc],
                                      global_pruning=global_pruning)
        if calibration is not None:
            m.zero_grad()
            for batch in calibration:
                default_loss(m(batch)).backward()
        pruner.step()
        if gp.count_macs(m, x) / dense <= target:
            hi, best = mid, m
        else:
            lo = mid
    return best


def tp_importances():
    """Torch-Pruning's criteria by graphprune's names: (importance, needs gradients, global ranking)."""
    import torch_pruning as tp

    return {"l1": (tp.importance.MagnitudeImportance(p=1), False, False),
            "l2": (tp.importance.MagnitudeImportance(p=2), False, False),
            "bn_scale": (tp.importance.BNScaleImportance(), False, False),
            "fpgm": (tp.importance.FPGMImportance(), False, False),
            "taylor": (tp.importance.TaylorImportance(), True, False),
            "lamp": (tp.importance.LAMPImportance(p=2), False, True),
            "random": (tp.importance.RandomImportance(), False, False)}


GP_SETTINGS = {"lamp": {"importance": "l2", "allocation": "global", "normalizer": "lamp"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="0.5,0.25", help="MACs to keep")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("--parts", default="cnn", help="cnn, minilm or both (comma-separated)")
    p.add_argument("--minilm-out", default=None, help="where the MiniLM part writes its table")
    args = p.parse_args(argv)
    if "minilm" in args.parts.split(","):
        import minilm

        out = ["--out", args.minilm_out] if args.minilm_out else []
        minilm.main(["--criteria", "default", "--tp", "l2,taylor", "--shares", "0.25,0.5", "--what",
                     "heads+MLP,MLP", "--calibration", "1200", "--jobs", "2", *out])
    if "cnn" not in args.parts.split(","):
        return 0
    torch.set_num_threads(2)
    train_set, test_set = data()
    torch.manual_seed(0)
    model = train(DigitsNet(), train_set, args.epochs)
    dense = accuracy(model, test_set)
    x = train_set[0][:8]
    calibration = list(train_set[0][:256].split(64))
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        for crit in CRITERIA:
            rows.append(_row(model, x, target, crit, calibration, train_set, test_set))
            print(f"done {target} {crit}", file=sys.stderr, flush=True)
    text = table(rows, dense)
    print(text)
    write_text(args.out, text)
    return 0


CRITERIA = ("default", "reconstruction", "l1", "l2", "bn_scale", "fpgm", "taylor", "obd", "activation", "wanda",
            "lamp", "random")


def _row(model, x, target, crit, calibration, train_set, test_set):
    """One table row: graphprune with each compensation and after one epoch,
    Torch-Pruning (if it has the criterion) one-shot and after one epoch."""
    how = GP_SETTINGS.get(crit, {"importance": None if crit == "default" else crit})
    plan = gp.plan(model, x, macs=target, ignore=[model.fc], calibration=calibration, **how)
    kept = gp.count_macs(gp.apply(model, plan), x) / gp.count_macs(model, x)
    accs = {mode: accuracy(gp.apply(model, plan, calibration=calibration, compensation=mode), test_set)
            for mode in ("none", "bn", "bias", "lstsq")}
    accs["tuned"] = accuracy(train(gp.apply(model, plan, calibration=calibration), train_set, 1, lr=1e-3),
                             test_set)
    tp_accs = ("-", "-")
    if crit in tp_importances():
        imp, grads, glob = tp_importances()[crit]
        tp_model = tp_prune(model, x, target, imp, calibration if grads else None, glob)
        if tp_model is None:
            tp_accs = ("fail", "fail")
        else:
            one_shot = accuracy(tp_model, test_set)
            tp_accs = (f"{one_shot:.1%}", f"{accuracy(train(tp_model, train_set, 1, lr=1e-3), test_set):.1%}")
    return target, crit, kept, accs, tp_accs


def table(rows, dense) -> str:
    out = [f"Digits CNN (scikit-learn digits, 1500 train / 297 test), dense accuracy {dense:.1%}; "
           "one-shot, no gradient step unless stated; compensation on 256 unlabelled training images. "
           "lamp: L2 scores, LAMP-normalised, one global ranking (both tools); taylor: the same label-free "
           "loss on the same 256 images for both tools; + 1 epoch: Adam, lr 1e-3, the 1500 labelled training "
           "images once.", "",
           "| MACs target | criterion | MACs kept | gp no comp. | gp BN recal. | gp bias comp. | gp lstsq comp. "
           "| gp lstsq + 1 epoch | Torch-Pruning | Torch-Pruning + 1 epoch |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for target, crit, kept, accs, tp_accs in rows:
        cells = [f"{accs[m]:.1%}" for m in ("none", "bn", "bias", "lstsq", "tuned")]
        out.append(f"| {target:.0%} | {crit} | {kept:.1%} | " + " | ".join(cells) + f" | {' | '.join(tp_accs)} |")
    return "\n".join(out)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
