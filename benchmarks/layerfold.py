"""LayerFold on a trained CNN: linearise low-entropy activations, fold, remove blocks.

The residual digits CNN of ``quality.py`` is trained the same way (seeded,
20 epochs, 2 torch threads, 1500 train / 297 held-out digits).  The
activation report (EASIER entropy) is computed on the training images (no
labels); for each k the k lowest-entropy activation sites are replaced by
the identity and the model is folded with the default rules (BatchNorm
always; conv/linear pairs and ``x + f(x)`` residuals where exact and not
more expensive).  Two extra rows force the inexact folds (moved padding)
to show what the default rules refuse.  Separately, the residual blocks are
ranked by Block Influence and the k lowest removed.  Every row reports
depth (conv/linear calls), MACs per image, onnxruntime latency (1 thread,
batch 1 and 64, interleaved medians) and held-out accuracy without and with
one epoch of fine-tuning (Adam, lr 1e-3).

    python benchmarks/layerfold.py --out benchmarks/results/layerfold.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.apply.onnx_export import export_onnx
from graphprune.layerfold.blocks import block_report, remove_blocks
from graphprune.layerfold.collapse import activation_report, choose_linearise
from graphprune.layerfold.torch_fold import fold, plan_fold

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_text  # noqa: E402  (benchmarks/ is not a package)
from onnx_latency import interleaved_medians, make_session  # noqa: E402
from quality import DigitsNet, accuracy, data, train  # noqa: E402

BATCHES = (1, 64)
TITLE = "# LayerFold on the trained digits CNN"
FOLD_HEADER = ("| sites linearised | fold rules | depth | MACs / image | ONNX nodes | ORT ms, batch 1 "
               "| ORT ms, batch 64 | acc. no FT | acc. 1-epoch FT | folds / refused |")
BLOCK_HEADER = ("| blocks removed | depth | MACs / image | ONNX nodes | ORT ms, batch 1 | ORT ms, batch 64 "
                "| acc. no FT | acc. 1-epoch FT |")


_START = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, with seconds since import."""
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Row:
    """One rewritten model: what was done, its size before -> after and its accuracy."""

    label: str
    rules: str
    sites: tuple[str, ...]
    depth: tuple[int, int]
    macs: tuple[int, int]
    acc: float
    acc_ft: float
    model: nn.Module = field(repr=False)
    plan: object = field(default=None, repr=False)  # FoldPlan of a fold row
    latency: dict = field(default_factory=dict)  # batch -> (seconds before, seconds after)
    ops: tuple = ()  # (ONNX op counts before, after): Counter of op types


def depth_of(model: nn.Module, x: torch.Tensor) -> int:
    """Conv/linear calls of one forward pass, counted on an fx trace."""
    return plan_fold(model, x, residual=False).depth_before


def macs_of(model: nn.Module, x: torch.Tensor) -> int:
    return gp.count_macs(model, x[:1])


def finetune(model: nn.Module, train_set, epochs: int, threads: int) -> nn.Module:
    """A copy of ``model`` trained ``epochs`` more (Adam, lr 1e-3, seeded as quality.py)."""
    with torch_threads(threads):
        return train(copy.deepcopy(model), train_set, epochs, lr=1e-3)


@contextlib.contextmanager
def torch_threads(n: int):
    """Torch intra-op threads set to ``n`` inside the context, restored on exit."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def choices(report, ks, forced: bool) -> list[tuple[str, list[str], dict]]:
    """(label, sites, fold options) per fold row: the k lowest-entropy sites, default rules,
    then (``forced``) the sites between two convs and all sites with inexact folds forced."""
    out = []
    for k in ks:
        k = len(report) if k is None or k > len(report) else k
        label = f"k={k}" + (" (all)" if k == len(report) and k else " (BN folding only)" if k == 0 else "")
        out.append((label, choose_linearise(report, k=k), {}))
    if forced:
        force = {"force": True, "only_if_cheaper": False}
        inner = [e.name for e in report if e.before and e.after]
        out.append((f"{len(inner)} between two convs", inner, force))
        out.append((f"k={len(report)} (all)", report.names(), force))
    return out


def fold_row(model, label, sites, options, x, sets, ft_epochs, threads) -> Row:
    """Linearise ``sites``, fold, measure depth / MACs / accuracy (no FT and FT)."""
    folded, rep = fold(model, x, linearise=sites, **options)
    depth_after = depth_of(folded, x)
    if depth_after != rep.depth_after:
        log(f"  warning: plan says depth {rep.depth_after}, the folded model calls {depth_after} layers")
    rules = "forced, any cost" if options.get("force") else "default"
    row = Row(label, rules, tuple(sites), (rep.depth_before, depth_after), (macs_of(model, x), macs_of(folded, x)),
              accuracy(folded, sets[1]), accuracy(finetune(folded, sets[0], ft_epochs, threads), sets[1]),
              folded, rep.plan)
    log(f"  {label} [{rules}]: {rep}; acc {row.acc:.1%} -> FT {row.acc_ft:.1%}")
    return row


def block_rows(model, cal, x, sets, ks, ft_epochs, threads) -> tuple[dict, list[Row]]:
    """Block Influence and loss scores, accuracy with each block removed alone, and removal rows."""
    cosine = block_report(model, cal, method="cosine")
    loss = block_report(model, cal, method="loss")
    alone = {n: accuracy(remove_blocks(model, [n], example_inputs=x), sets[1]) for n in cosine.names()}
    scores = {"cosine": cosine, "loss": loss, "alone": alone}
    rows = []
    for k in ks:
        slim = remove_blocks(model, cosine, k=k, example_inputs=x)
        row = Row(f"{k}: {', '.join(cosine.names()[:k])}", "blocks", tuple(cosine.names()[:k]),
                  (depth_of(model, x), depth_of(slim, x)), (macs_of(model, x), macs_of(slim, x)),
                  accuracy(slim, sets[1]), accuracy(finetune(slim, sets[0], ft_epochs, threads), sets[1]), slim)
        log(f"  remove {row.sites}: depth {row.depth}, acc {row.acc:.1%} -> FT {row.acc_ft:.1%}")
        rows.append(row)
    return scores, rows


def measure_latency(dense: nn.Module, rows: list[Row], x: torch.Tensor, X: torch.Tensor, rounds: int,
                    threads: int) -> dict:
    """Export dense and every row's model to ONNX (parity-checked), time them interleaved.

    Sets ``row.latency[batch] = (dense s, row s)`` and ``row.ops`` (ONNX op counts);
    returns ``{batch: dense s}``."""
    dense_s = {}
    with tempfile.TemporaryDirectory() as folder:
        paths, ops = [], []
        for i, m in enumerate([dense] + [r.model for r in rows]):
            paths.append(os.path.join(folder, f"m{i}.onnx"))
            export_onnx(m, x, paths[-1])
            ops.append(Counter(n.op_type for n in onnx.load(paths[-1]).graph.node))
        for r, counts in zip(rows, ops[1:]):
            r.ops = (ops[0], counts)
        for b in BATCHES:
            sessions = [make_session(p, threads) for p in paths]
            med = interleaved_medians(sessions, {"input": X[:b].numpy()}, rounds)
            dense_s[b] = med[0]
            for r, t in zip(rows, med[1:]):
                r.latency[b] = (med[0], t)
            log(f"  latency batch {b}: dense {med[0] * 1e3:.3f} ms")
    return dense_s


def run_benchmark(epochs=20, n_train=None, ks=(0, 1, 2, 4, None), block_ks=(1, 2), forced=True, rounds=30,
                  ft_epochs=1, threads=1, train_threads=2) -> dict:
    """Train, report, fold, remove blocks, time; returns everything :func:`markdown` needs.

    ``train_threads`` torch threads train the dense net (2 reproduces quality.py's weights);
    fine-tuning, calibration and timing use ``threads``."""
    t0 = time.perf_counter()
    train_set, test_set = data()
    if n_train is not None:
        train_set = (train_set[0][:n_train], train_set[1][:n_train])
    sets = (train_set, test_set)
    with torch_threads(train_threads):
        torch.manual_seed(0)
        model = train(DigitsNet(), train_set, epochs)
    dense_acc = accuracy(model, test_set)
    log(f"trained {epochs} epochs on {len(train_set[0])} digits: accuracy {dense_acc:.1%}")
    x, cal = train_set[0][:8], list(train_set[0].split(250))
    report = activation_report(model, cal)
    log("activation report: " + ", ".join(f"{e.name} {e.entropy:.3f} {e.state}" for e in report))
    rows = [fold_row(model, label, sites, opts, x, sets, ft_epochs, threads)
            for label, sites, opts in choices(report, ks, forced)]
    all_sites = report.names()
    cost_plan = plan_fold(model, x, linearise=all_sites, force=True, only_if_cheaper=True)
    scores, brows = block_rows(model, cal, x, sets, block_ks, ft_epochs, threads)
    dense_ft = accuracy(finetune(model, train_set, ft_epochs, threads), test_set)
    dense_s = measure_latency(model, rows + brows, x, test_set[0], rounds, threads)
    return {"model": model, "dense_acc": dense_acc, "dense_ft": dense_ft, "report": report, "rows": rows,
            "cost_plan": cost_plan, "blocks": scores, "block_rows": brows, "dense_s": dense_s,
            "n_train": len(train_set[0]), "n_test": len(test_set[0]), "epochs": epochs, "ft_epochs": ft_epochs,
            "threads": threads, "seconds": time.perf_counter() - t0}


# -- markdown -------------------------------------------------------------------------------------

def _mega(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def _arrow(pair, fmt=str) -> str:
    return f"{fmt(pair[0])} → {fmt(pair[1])}"


def _ms(row: Row, b: int) -> str:
    return _arrow(row.latency[b], lambda s: f"{s * 1e3:.3f}") if b in row.latency else "-"


def _nodes(row: Row) -> str:
    return _arrow([sum(c.values()) for c in row.ops]) if row.ops else "-"


def _fold_cells(row: Row) -> str:
    kinds = Counter(s.kind for s in row.plan.folds)
    done = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"
    return f"{done} / {len(row.plan.refused)}"


def fold_table(result: dict) -> list[str]:
    out = [FOLD_HEADER, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sites = ", ".join(f"`{s}`" for s in r.sites) or "none"
        out.append(f"| {r.label}: {sites} | {r.rules} | {_arrow(r.depth)} | {_arrow(r.macs, _mega)} | {_nodes(r)} "
                   f"| {_ms(r, 1)} | {_ms(r, 64)} | {r.acc:.1%} | {r.acc_ft:.1%} | {_fold_cells(r)} |")
    return out


def activation_table(report) -> list[str]:
    out = ["| site | module / fx node | entropy (bits) | TLC | state | fraction > 0 | conv before | conv after |",
           "|---|---|---|---|---|---|---|---|"]
    for e in report:
        tlc = f"{e.tlc:.3f}" if e.tlc is not None else "-"
        out.append(f"| `{e.name}` | {'module' if e.module else 'F.relu'} | {e.entropy:.3f} | {tlc} | {e.state} | "
                   f"{e.positive_fraction:.2f} | {e.before or '-'} | {e.after or '-'} |")
    return out


def refusal_kind(reason: str) -> str:
    """Short category of a refused fold's reason."""
    if "padding of the intermediate map" in reason:
        return "padding of the intermediate map cannot move to the input"
    if "readers" in reason:
        return "the first layer's output has two readers (the residual skip)"
    if "costs more" in reason:
        return "the folded layer costs more MACs"
    return reason


def refusal_lines(plan) -> list[str]:
    if not plan.refused:
        return ["none"]
    out = ["| refused candidate | reason |", "|---|---|"]
    return out + [f"| {s.kind} {' + '.join(s.modules)} | {s.reason} |" for s in plan.refused]


def block_tables(result: dict) -> list[str]:
    cos, loss, alone = (result["blocks"][k] for k in ("cosine", "loss", "alone"))
    out = ["| block | Block Influence (1 − cos) | loss score (output MSE when skipped) | acc. with only it removed |",
           "|---|---|---|---|"]
    for e in cos:
        out.append(f"| {e.name} | {e.score:.4f} | {loss[e.name].score:.4g} | {alone[e.name]:.1%} |")
    out += ["", BLOCK_HEADER, "|---|---|---|---|---|---|---|---|"]
    for r in result["block_rows"]:
        out.append(f"| {r.label} | {_arrow(r.depth)} | {_arrow(r.macs, _mega)} | {_nodes(r)} | {_ms(r, 1)} "
                   f"| {_ms(r, 64)} | {r.acc:.1%} | {r.acc_ft:.1%} |")
    return out


def markdown(result: dict, command: str) -> str:
    """The whole results page."""
    r = result
    ms = ", ".join(f"batch {b} {s * 1e3:.3f} ms" for b, s in r["dense_s"].items())
    out = [TITLE, "", f"Command: `{command}`  ", f"torch {torch.__version__}, onnxruntime {ort.__version__}, "
           f"{r['threads']} onnxruntime thread(s); total run {r['seconds']:.0f} s on a shared 2-core machine.", "",
           f"DigitsNet of `quality.py` trained {r['epochs']} epochs (seeded) on {r['n_train']} digits, "
           f"{r['n_test']} held out: dense accuracy {r['dense_acc']:.1%} ({r['dense_ft']:.1%} after "
           f"{r['ft_epochs']} more epoch at lr 1e-3); dense onnxruntime latency {ms}. "
           "Depth = conv/linear calls; MACs per image; ONNX nodes of the exported file (the exporter folds "
           "conv→BN in every file, the dense one included); latency = median of interleaved runs, 1 intra-op "
           "thread, sequential (`dense → rewritten`); acc. = held-out accuracy; FT = one epoch of Adam at lr 1e-3 "
           "on the rewritten model.", "",
           "## Activation sites (EASIER entropy on the unlabelled training images, lowest first)", "",
           *activation_table(r["report"]), "", "## Linearise the k lowest-entropy sites, then fold", "",
           *fold_table(r), "", f"Fold candidates refused in the row `{all_row(r).label}` (default rules):", "",
           *refusal_lines(all_row(r).plan), "", "## Block removal (Block Influence, lowest removed first)", "",
           *block_tables(r), "", "## Reading", "", reading(r)]
    return "\n".join(out) + "\n"


def all_row(result: dict) -> Row:
    """The default-rules row with the most sites linearised."""
    return max((r for r in result["rows"] if r.rules == "default"), key=lambda r: len(r.sites))


# -- the reading paragraph ----------------------------------------------------------------------------

def _states_sentence(report) -> str:
    states = Counter(e.state for e in report)
    ent = [e.entropy for e in report if e.entropy is not None]
    listed = f"all {next(iter(states))}" if len(states) == 1 else ", ".join(f"{n} {s}" for s, n in states.items())
    text = (f"The {len(report)} ReLU sites are {listed} on the calibration data (entropy {min(ent):.3f}–"
            f"{max(ent):.3f} bits; 1 bit = on half the time)")
    if not {"identity", "masked"} & states.keys():
        text += (": none already acts as identity or as a fixed 0/1 mask, so `states=(\"identity\", \"masked\")` "
                 "would choose nothing, and every row follows the EASIER recipe instead — the chosen ReLUs become "
                 "identity, which changes the function, then one epoch of fine-tuning")
    inner = [i + 1 for i, e in enumerate(report) if e.before and e.after]
    if inner:
        text += (f"; the {len(inner)} sites between two convs — the only ones whose removal can make a conv pair "
                 f"adjacent — rank {', '.join(map(str, inner))} of {len(report)} (lowest entropy first)")
    zero = states.get("zero", 0)
    text += (f"; {zero} sites are \"zero\" on the data and are still replaced by identity" if zero else
             "; no site is \"zero\", so identity is never chosen where the data says 0")
    return text + "."


def _bn_sentence(result: dict) -> str:
    rows = [r for r in result["rows"] if not r.sites and r.rules == "default"]
    if not rows:
        return ""
    r = rows[0]
    same = "exactly" if r.acc == result["dense_acc"] else "NOT exactly"
    nodes = [sum(c.values()) for c in r.ops] if r.ops else [0, 1]
    text = (f"BN folding alone (k=0) folds {len(r.plan.folds)} BatchNorms and keeps the accuracy {same} "
            f"({r.acc:.1%} vs {result['dense_acc']:.1%}); it removes no conv/linear layer (depth {_arrow(r.depth)}; "
            f"MACs {_arrow(r.macs, _mega)}, the counter counts no BN work)")
    if nodes[0] == nodes[1]:
        text += (f", and its ONNX file has the same {nodes[0]} nodes as the dense one because the exporter folds "
                 f"BN too, so its latency difference ({_ms(r, 64)} ms at batch 64) is timing noise")
    return text + "."


def _ratio(row: Row, b: int) -> str:
    before, after = row.latency[b]
    return f"{after / before:.2f}×"


def _linearise_sentence(result: dict) -> str:
    rows = [r for r in result["rows"] if r.sites and r.rules == "default"]
    if not rows:
        return ""
    ks = ", ".join(str(len(r.sites)) for r in rows)
    text = (f"Linearising the k = {ks} lowest-entropy ReLUs gives {', '.join(f'{r.acc:.1%}' for r in rows)} "
            f"without fine-tuning and {', '.join(f'{r.acc_ft:.1%}' for r in rows)} after one epoch (dense "
            f"{result['dense_acc']:.1%}; dense + one epoch {result['dense_ft']:.1%}).")
    helped = [r for r in rows if r.acc_ft > r.acc]
    if helped:
        back = [str(len(r.sites)) for r in helped if r.acc_ft >= result["dense_acc"]]
        text += (f" Fine-tuning wins back accuracy for k = {', '.join(str(len(r.sites)) for r in helped)}, "
                 + (f"up to dense for k = {', '.join(back)}." if back else "but in no row up to dense."))
    hurt = [f"{len(r.sites)} ({r.acc:.1%} → {r.acc_ft:.1%})" for r in result["rows"]
            if r.rules == "default" and r.acc_ft < r.acc]
    k0 = next((r for r in result["rows"] if not r.sites), None)
    if hurt:
        text += f" It lowers accuracy for k = {', '.join(hurt)}"
        bn_helps = k0 is not None and k0.acc_ft < result["dense_ft"]
        text += (f"; k=0 computes exactly the dense function, yet one epoch on it without BatchNorm gives "
                 f"{k0.acc_ft:.1%} against {result['dense_ft']:.1%} with BatchNorm." if bn_helps else ".")
    if all(r.depth[1] == r.depth[0] for r in rows):
        relu = [r.ops[0].get("Relu", 0) - r.ops[1].get("Relu", 0) for r in rows if r.ops]
        text += (" Under the default rules none of these rows loses a conv/linear layer, so depth and MACs stay put; "
                 f"the ONNX graphs lose only Relu nodes ({', '.join(map(str, relu))}), and batch-64 latency moves by "
                 f"{', '.join(_ratio(r, 64) for r in rows if 64 in r.latency)} of dense.")
    return text


def _refusal_sentence(result: dict) -> str:
    row = all_row(result)
    pairs = [s for s in row.plan.refused if s.kind.endswith("_pair")]
    done = [s for s in row.plan.folds if s.kind.endswith("_pair")]
    if not pairs and not done:
        return f"With {len(row.sites)} sites linearised no conv/linear pair becomes adjacent."
    kinds = Counter(refusal_kind(s.reason) for s in pairs)
    text = (f"With {len(row.sites)} sites linearised the default planner meets {len(pairs) + len(done)} conv-pair "
            f"candidates and refuses {len(pairs)}: " + "; ".join(f"{n} because {k}" for k, n in kinds.items()) + ".")
    cost = [s for s in result["cost_plan"].refused if "costs more" in s.reason]
    if cost:
        text += (f" With the padding refusal overridden (`force=True`), `only_if_cheaper` still refuses {len(cost)} "
                 f"pairs ({cost[0].reason}).")
    return text


def _forced_sentence(result: dict) -> str:
    rows = [r for r in result["rows"] if r.rules != "default"]
    if not rows:
        return ""
    parts = [f"{r.label} — depth {_arrow(r.depth)}, MACs {_arrow(r.macs, _mega)}, batch-64 latency "
             f"{_ratio(r, 64) if 64 in r.latency else '-'} of dense, accuracy {r.acc:.1%} ({r.acc_ft:.1%} after "
             "fine-tuning)" for r in rows]
    return ("Overriding both (`force=True, only_if_cheaper=False`: zero padding moves to the input, which changes "
            "every border pixel, most of an 8×8 map) does shrink depth: " + "; ".join(parts) + ".")


def _block_sentence(result: dict) -> str:
    cos, alone = result["blocks"]["cosine"], result["blocks"]["alone"]
    accs = [alone[n] for n in cos.names()]
    agree = ("agrees with" if all(a >= b for a, b in zip(accs, accs[1:])) else "does not fully agree with")
    rows = "; ".join(f"removing {len(r.sites)} gives depth {_arrow(r.depth)}, MACs {_arrow(r.macs, _mega)}, "
                     f"batch-64 latency {_ratio(r, 64) if 64 in r.latency else '-'} of dense, accuracy {r.acc:.1%} "
                     f"({r.acc_ft:.1%} after fine-tuning)" for r in result["block_rows"])
    loss = result["blocks"]["loss"]
    loss_accs = [alone[n] for n in loss.names()]
    loss_agree = "agrees" if all(a >= b for a, b in zip(loss_accs, loss_accs[1:])) else "does not fully agree"
    text = (f"Block Influence ranks {' < '.join(cos.names())}, which {agree} the accuracy with each block removed "
            f"alone ({', '.join(f'{a:.1%}' for a in accs)} in that order); the loss score ranks "
            f"{' < '.join(loss.names())} and {loss_agree}. {rows[:1].upper() + rows[1:]}.")
    folds_cut = any(r.depth[1] < r.depth[0] for r in result["rows"] if r.rules == "default")
    if result["block_rows"] and not folds_cut:
        text += " Under the exact (default) rules only block removal cuts depth, MACs and latency here."
    return text


def reading(result: dict) -> str:
    parts = [_states_sentence(result["report"]), _bn_sentence(result), _linearise_sentence(result),
             _refusal_sentence(result), _forced_sentence(result), _block_sentence(result)]
    return " ".join(p for p in parts if p)


# -- command line --------------------------------------------------------------------------------

def _ks(text: str) -> tuple:
    return tuple(None if t == "all" else int(t) for t in text.split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20, help="training epochs of the dense net (quality.py: 20)")
    p.add_argument("--ks", default="0,1,2,4,all", help="numbers of lowest-entropy sites to linearise")
    p.add_argument("--blocks", default="1,2", help="numbers of lowest-scoring blocks to remove")
    p.add_argument("--no-forced", action="store_true", help="leave out the two forced-fold rows")
    p.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds (3 runs each)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime and torch threads (all but dense training)")
    p.add_argument("--train-threads", type=int, default=2,
                   help="torch threads for training the dense net (quality.py uses 2: same weights)")
    p.add_argument("--out", default="benchmarks/results/layerfold.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_benchmark(args.epochs, None, _ks(args.ks), tuple(int(k) for k in args.blocks.split(",")),
                           not args.no_forced, args.rounds, 1, args.threads, args.train_threads)
    command = " ".join(["python benchmarks/layerfold.py", *(sys.argv[1:] if argv is None else argv)])
    text = markdown(result, command)
    print(text)
    write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
