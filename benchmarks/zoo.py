"""Side-by-side sweep of graphprune and Torch-Pruning over the torchvision classifiers.

Run from the repository root (offline; weights are never downloaded)::

    python benchmarks/zoo.py                                   # all 80 models, ratio 0.5
    python benchmarks/zoo.py --models resnet18,densenet121 --repeats 3
    python benchmarks/zoo.py --skip-heavy --json benchmarks/results/zoo.json

Every model of ``torchvision.models.list_models(module=torchvision.models)`` is
built with ``weights=None`` from the same seed and given lively BatchNorm
statistics (``graphprune.zoo.lively_init``).  Both tools then remove the same
fraction (``--ratio``) of the channels of every prunable group with L2
magnitude importance, and both are told to leave alone the same modules: the
``nn.Linear``/``nn.Conv2d`` layers with 1000 (= number of classes) outputs.
No model-specific recipe is given to either tool.

Per model and tool it records

* success, or the stage that failed and the error in one line;
* the fraction of parameters and of MACs kept (both counted with
  ``graphprune.count_macs`` / ``count_params``, so the numbers are comparable);
* wall time to analyse and prune, ``time.perf_counter``, median of
  ``--repeats`` runs (graphprune: ``plan`` + ``apply``; Torch-Pruning:
  ``MetaPruner`` construction + ``step``);
* whether the pruned model runs and keeps its output shape, and for
  graphprune whether the oracle ``gp.verify`` passes ("lossy LN" when the plan
  has groups that cross LayerNorm/attention statistics, which the oracle
  measures rather than checks exactly).

Each (model, tool) pair runs in its own subprocess (2 torch threads) with a
timeout (``--timeout``, 900 s) and an address-space cap (``--mem-limit-gb``,
16 GiB), so a crash, hang or runaway allocation in one does not stop the sweep.
Progress goes to stderr, the markdown table to stdout and to ``--out``
(default ``benchmarks/results/zoo.md``), raw results to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HEAVY = ["vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_x_32gf", "efficientnet_b7",
         "efficientnet_b6", "efficientnet_v2_l", "convnext_large", "swin_v2_b", "swin_b", "regnet_y_16gf"]
NUM_CLASSES = 1000
MARK = "ZOO-RESULT "  # prefix of the worker's one JSON line on stdout
from common import source_state, write_text  # noqa: E402  (benchmarks/ is not a package)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- worker (one model, one tool)

def classifier_layers(model):
    """The layers producing the class scores: Linear/Conv2d with NUM_CLASSES outputs."""
    import torch.nn as nn

    return [m for m in model.modules()
            if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
            or (isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES)]


def blank(name: str, tool: str, stage: str, error: str | None = None) -> dict:
    return {"model": name, "tool": tool, "ok": False, "stage": stage, "error": error, "times": [], "time": None,
            "runs": False, "shape_ok": False, "params_kept": None, "macs_kept": None, "verified": None, "lossy": None,
            "cpu_times": []}


def one_line(stage: str, err: BaseException) -> str:
    hint = "(over the --mem-limit-gb cap?)" if isinstance(err, MemoryError) else ""
    msg = (str(err).strip().splitlines() or [hint])[0]
    return f"{stage}: {type(err).__name__}: {msg}"[:300]


def _prune_gp(model, x, ratio, repeats, res):
    import graphprune as gp

    times = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        res["stage"] = "plan"
        plan = gp.plan(model, x, ratio=ratio, importance="l2", ignore=classifier_layers(model))
        res["stage"] = "apply"
        slim = gp.apply(model, plan)
        times.append(time.perf_counter() - t0)
        res["cpu_times"].append(time.process_time() - c0)  # JSON only: steadier than wall time under load
    return slim, times, plan


def _prune_tp(model, x, ratio, repeats, res):
    import copy

    import torch_pruning as tp

    times = []
    for _ in range(repeats):
        pruned = copy.deepcopy(model)  # TP prunes in place; copying is not timed
        t0, c0 = time.perf_counter(), time.process_time()
        res["stage"] = "MetaPruner"
        pruner = tp.pruner.MetaPruner(pruned, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=classifier_layers(pruned))
        res["stage"] = "step"
        pruner.step()
        times.append(time.perf_counter() - t0)
        res["cpu_times"].append(time.process_time() - c0)  # JSON only: steadier than wall time under load
    return pruned, times, None


def _check(tool, model, pruned, plan, x, res):
    """Forward, shape, metrics and (graphprune) the oracle; fills ``res``."""
    import torch

    import graphprune as gp

    res["params_kept"] = gp.count_params(pruned) / gp.count_params(model)
    res["stage"] = "forward"
    with torch.no_grad():
        want, got = model(x).shape, pruned(x).shape
    res["runs"] = True
    res["shape_ok"] = want == got
    if want != got:
        raise RuntimeError(f"output shape {tuple(got)} != original {tuple(want)}")
    res["stage"] = "count_macs"
    res["macs_kept"] = gp.count_macs(pruned, x) / gp.count_macs(model, x)
    if tool == "graphprune":
        res["stage"] = "verify"
        report = gp.verify(model, pruned, plan, x)
        res["verified"] = True
        res["lossy"] = bool(report.lossy_groups)
        res["oracle"] = str(report)


def worker(tool: str, name: str, ratio: float, repeats: int) -> dict:
    """Build, prune, check; never raises (the error goes into the result)."""
    import warnings

    warnings.simplefilter("ignore")
    import torch

    from graphprune.zoo import build, lively_init

    torch.set_num_threads(2)
    res = blank(name, tool, "build")
    try:
        torch.manual_seed(0)
        model, x = build("torchvision:" + name)
        lively_init(model, seed=0)
        prune = _prune_gp if tool == "graphprune" else _prune_tp
        pruned, res["times"], plan = prune(model, x, ratio, repeats, res)
        res["time"] = statistics.median(res["times"])
        _check(tool, model, pruned, plan, x, res)
        res["ok"], res["stage"] = True, None
    except Exception as err:  # every failure is a data point
        if tool == "graphprune" and res["stage"] == "verify":
            res["verified"] = False
        res["error"] = one_line(res["stage"], err)
    return res


# ----------------------------------------------------------------------------- driver

def memory_cap(gb: float):
    """A ``preexec_fn`` capping the worker's address space: a runaway run then fails with an
    allocation error instead of waking the kernel's OOM killer on a shared machine."""
    limit = int(gb * 2**30)
    return (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))) if gb > 0 else None


def run_one(tool: str, name: str, args) -> dict:
    """Run ``worker`` in a subprocess and turn every way it can die into a result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", tool, name,
           "--ratio", str(args.ratio), "--repeats", str(args.repeats)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env,
                              preexec_fn=memory_cap(args.mem_limit_gb))
    except subprocess.TimeoutExpired:
        return blank(name, tool, "timeout", f"timeout: no result after {args.timeout:g} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    if proc.returncode == -9:
        how += " (kernel OOM killer?)"
    return blank(name, tool, "crash", f"crash: {how}: {tail}")


def status(r: dict) -> str:
    if not r["ok"]:
        return f"FAIL ({r['stage']})"
    return "yes (lossy LN)" if r["lossy"] else "yes"


def pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def secs(r: dict) -> str:
    return "-" if r["time"] is None else f"{r['time']:.2f}"


def ratio_of(gp_r: dict, tp_r: dict) -> float | None:
    """TP time / graphprune time, when both tools got through pruning."""
    return tp_r["time"] / gp_r["time"] if gp_r["time"] and tp_r["time"] else None


def table(results: dict, args) -> str:
    """The markdown report: settings, table, summary and failure details."""
    from importlib.metadata import version

    import torch
    import torchvision

    import graphprune

    head = ["model", "graphprune ok", "TP ok", "gp params kept", "TP params kept", "gp MACs kept", "TP MACs kept",
            "gp time (s)", "TP time (s)", "TP time / gp time"]
    lines = [f"# graphprune vs Torch-Pruning on torchvision classifiers (ratio {args.ratio})", "",
             f"torch {torch.__version__}, torchvision {torchvision.__version__}, torch-pruning "
             f"{version('torch-pruning')}, graphprune {graphprune.__version__} ({source_state()}); "
             f"2 threads, median of {args.repeats} run(s); {time.strftime('%Y-%m-%d %H:%M')}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, (g, t) in results.items():
        r = ratio_of(g, t)
        cells = [name, status(g), status(t), pct(g["params_kept"]), pct(t["params_kept"]),
                 pct(g["macs_kept"]), pct(t["macs_kept"]), secs(g), secs(t), "-" if r is None else f"{r:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    n_gp, n_tp = (sum(pair[k]["ok"] for pair in results.values()) for k in (0, 1))
    lines += ["", "Times: graphprune plan+apply, TP MetaPruner+step; shown whenever pruning finished, even if a later",
              "check failed. \"lossy LN\": the plan crosses LayerNorm/attention statistics (oracle measures it).", "",
              f"**Summary:** graphprune {n_gp}/{len(results)} ok, Torch-Pruning {n_tp}/{len(results)} ok."]
    ratios = [r for g, t in results.values() if (r := ratio_of(g, t)) is not None]
    if ratios:
        lines[-1] += f" Median TP time / gp time over {len(ratios)} models: {statistics.median(ratios):.2f}x."
    if "densenet201" in results and (r := ratio_of(*results["densenet201"])) is not None:
        g, t = results["densenet201"]
        lines[-1] += f" **densenet201: TP {t['time']:.1f} s vs graphprune {g['time']:.1f} s = {r:.1f}x.**"
    errors = [f"- {r['model']} / {r['tool']}: {r['error']}" for pair in results.values() for r in pair if r["error"]]
    if errors:
        lines += ["", "Failures:", ""] + errors
    return "\n".join(lines) + "\n"


def model_names(args) -> list[str]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            sys.exit(f"zoo.py: unknown torchvision classifiers: {', '.join(unknown)}")
        names = wanted
    if args.skip_heavy:
        names = [n for n in names if n not in HEAVY]
    return names


def sweep(args) -> None:
    names = model_names(args)
    results, start = {}, time.perf_counter()
    for i, name in enumerate(names, 1):
        g, t = run_one("graphprune", name, args), run_one("torch-pruning", name, args)
        results[name] = (g, t)
        print(f"[{i}/{len(names)}] {name:20s} gp {status(g):18s} {secs(g):>7} s | TP {status(t):18s} {secs(t):>7} s"
              f" | {time.perf_counter() - start:6.0f}s elapsed", file=sys.stderr, flush=True)
        for r in (g, t):
            if r["error"]:
                print(f"    {r['tool']}: {r['error']}", file=sys.stderr, flush=True)
    md = table(results, args)
    print(md, end="")
    write_text(args.out, md)
    write_text(args.json, json.dumps([r for p in results.values() for r in p], indent=1))


def merge(args) -> None:
    """Re-render one table from the JSON of earlier runs (no pruning)."""
    import torchvision

    records = [r for path in args.from_json.split(",") for r in json.load(open(path))]
    by_model: dict[str, dict] = {}
    for r in records:
        by_model.setdefault(r["model"], {})[r["tool"]] = r
    order = torchvision.models.list_models(module=torchvision.models)
    results = {n: (by_model[n]["graphprune"], by_model[n]["torch-pruning"]) for n in order
               if n in by_model and {"graphprune", "torch-pruning"} <= set(by_model[n])}
    md = table(results, args).replace("\n\n", f"\n\nMerged from {args.from_json}.\n\n", 1)
    print(md, end="")
    write_text(args.out, md)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated torchvision names (default: all 80)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of each group's channels to remove")
    p.add_argument("--repeats", type=int, default=1, help="time each tool this many times; the median is reported")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per (model, tool) subprocess")
    p.add_argument("--mem-limit-gb", type=float, default=16,
                   help="address-space cap per subprocess in GiB (0: none); beyond it a run fails, not the machine")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "zoo.md"), help="markdown output")
    p.add_argument("--json", default=None, help="also write the raw results as JSON here")
    p.add_argument("--skip-heavy", action="store_true", help=f"skip the biggest models ({', '.join(HEAVY)})")
    p.add_argument("--from-json", default=None,
                   help="comma-separated --json files of earlier runs: merge them into one table, prune nothing")
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.repeats < 1 or not 0 <= args.ratio < 1:
        p.error("--repeats must be >= 1 and --ratio in [0, 1)")
    if args.worker:
        print(MARK + json.dumps(worker(*args.worker, args.ratio, args.repeats)), flush=True)
    elif args.from_json:
        merge(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
