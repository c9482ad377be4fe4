"""graphprune vs Torch-Pruning on Hugging Face LLaMA configs of growing depth, and a Llama-2-7B config on ``meta``.

Run from the repository root (offline: models are built from configs, nothing is downloaded)::

    python benchmarks/llama.py --json benchmarks/results/transformers.json
    python benchmarks/llama.py --layers 16 --repeats 3 --skip-7b

Models: ``LlamaForCausalLM`` (``--hidden`` 256, ``--num-heads`` 8 / ``--kv-heads`` 4, ``--intermediate``
688, ``--vocab`` 1000, ``--layers`` 16,32,48), random init from seed 0, input ``1 x --seq`` ids.  Both
tools remove ``--ratio`` of the MLP channels and ``--heads`` of the attention heads of every layer and
keep the hidden width.  graphprune: ``gp.plan(model, {"input_ids": ids}, ratio=r, heads=h)`` +
``gp.apply``.  Torch-Pruning: the recipe of its ``examples/LLMs/prune_llm.py`` (``MetaPruner``,
``GroupMagnitudeImportance(p=2, group_reduction="mean")``, ``num_heads`` for q/k/v,
``prune_num_heads=True``, ``prune_head_dims=False``, ``head_pruning_ratio=h``, ``round_to=4``, lm_head
ignored, then the example's hand-written attribute and config update) with two adaptations:
``embed_tokens`` is ignored too (the example also prunes the hidden width) and
``output_transform=lambda out: out.logits`` (TP's tracer cannot walk transformers 5's cache object).
A watchdog stops TP's group search once an index exceeds 4x the widest tensor (``--no-tp-watchdog``:
off); when the head recipe fails so, TP is timed again with the attention modules ignored (MLP
channels only) and the row says so.

Reported per model and tool: ok or the failing stage with a one-line error, plan+apply time (median
of ``--repeats``; both tools prune a ``deepcopy`` of the model in place, the copy untimed: TP
``MetaPruner`` + ``step`` + attribute update, graphprune ``gp.plan`` + ``gp.apply(inplace=True)``;
graphprune's default copying ``gp.apply`` is timed too, in its own column), peak RSS, parameters
kept, whether the pruned model runs with the original logits shape, whether ``save_pretrained`` ->
``from_pretrained`` gives the same logits and, for graphprune, ``gp.load_pretrained`` and the oracle
``gp.verify``; graphprune's capture method and, unless ``--no-export-capture``, the time
``torch.export`` capture alone takes on the same model.  Unless ``--skip-7b``, a ``LlamaConfig``
with the Llama-2-7B sizes is built under ``torch.device("meta")`` and taken stage by stage as far
as each tool gets (time and peak RSS per stage, address space capped at ``--meta-mem-gb``).  Every
(model, tool) pair runs in its own subprocess (``--threads``, ``--timeout``, ``--mem-limit-gb``);
progress goes to
stderr, the markdown to stdout and ``--out``, raw results to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import write_text  # noqa: E402
from llama_report import META, TOOLS, render, secs  # noqa: E402  (benchmarks/ is not a package)

ROOT = os.path.dirname(HERE)
MARK, STAGE_MARK = "HF-RESULT ", "HF-STAGE "  # prefixes of the worker's JSON lines on stdout


# ----------------------------------------------------------------------------- models and small helpers

def llama_config(args, layers: int):
    """The benchmark's LLaMA config (``layers`` decoder layers), or Llama-2-7B sizes for ``META``."""
    import transformers

    if layers == META:
        return transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                        num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)
    return transformers.LlamaConfig(hidden_size=args.hidden, num_hidden_layers=int(layers),
                                    num_attention_heads=args.num_heads, num_key_value_heads=args.kv_heads,
                                    intermediate_size=args.intermediate, vocab_size=args.vocab)


def build(args, layers):
    """A seeded, randomly initialised ``LlamaForCausalLM`` in eval mode and its example token ids."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(args, layers)).eval()
    return model, torch.randint(0, args.vocab, (1, args.seq))


def blank(model: str, tool: str, stage: str = "build", error: str | None = None) -> dict:
    """A result row before anything has run."""
    return {"model": model, "tool": tool, "ok": False, "stage": stage, "error": error, "target": "MLP+heads",
            "times": [], "time": None, "time_mlp": None, "rss_model_mb": None, "rss_peak_mb": None,
            "params_kept": None, "runs": False, "shape_ok": False, "config_native": None, "config_native_note": None,
            "config_gp": None, "config_gp_note": None, "verified": None, "verify_note": None, "recipe_error": None,
            "stages": [], "capture": None, "time_export_capture": None, "time_copying": None}


def one_line(stage: str, err: BaseException) -> str:
    """``stage: Type: first line of the message`` (at most 300 characters)."""
    hint = "(over the address-space cap?)" if isinstance(err, MemoryError) else ""
    msg = (str(err).strip().splitlines() or [hint])[0]
    if "ignore_mismatched_sizes" in msg:  # transformers' refusal; the size report went to the log
        msg = "refused: parameter shapes differ from the ones the config describes"
    return f"{stage}: {type(err).__name__}: {msg}"[:300]


def rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def logits(model, ids):
    """The model's logits for ``ids`` (no grad)."""
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _reload(load, ref, ids) -> tuple[bool, str]:
    """Load a saved model with ``load()`` and compare its logits with ``ref``."""
    try:
        diff = (logits(load().eval(), ids) - ref).abs().max().item()
        return diff <= 1e-5, f"max |diff| {diff:.1e}"
    except Exception as err:  # a refusal is a data point
        return False, one_line("reload", err).replace("reload: RuntimeError: refused", "refused")


def check_model(model, pruned, ids, res: dict, gp_reload: bool) -> None:
    """Forward, logits shape, params kept, save_pretrained -> from_pretrained (and gp.load_pretrained)."""
    res["stage"] = "forward"
    want, got = logits(model, ids), logits(pruned, ids)
    res["runs"], res["shape_ok"] = True, want.shape == got.shape
    res["params_kept"] = count(pruned) / count(model)
    if not res["shape_ok"]:
        raise RuntimeError(f"logits shape {tuple(got.shape)} != original {tuple(want.shape)}")
    res["stage"] = "save_pretrained"
    with tempfile.TemporaryDirectory() as tmp:
        pruned.save_pretrained(tmp)
        res["config_native"], res["config_native_note"] = _reload(lambda: type(pruned).from_pretrained(tmp), got, ids)
        shapes = getattr(pruned.config, "graphprune_shapes", None)
        if shapes:
            res["config_native_note"] += f" (config.graphprune_shapes lists {len(shapes)} tensors)"
        if gp_reload:
            import graphprune as gp

            res["config_gp"], res["config_gp_note"] = _reload(lambda: gp.load_pretrained(tmp), got, ids)


# ----------------------------------------------------------------------------- graphprune worker

def _gp_prune(model, ids, ratio, heads, repeats, res, inplace=True):
    """``gp.plan`` + ``gp.apply`` ``repeats`` times; returns the last slim model, plan and the times.

    ``inplace``: the protocol of the TP rows (a ``deepcopy`` of the model, untimed, pruned in place);
    otherwise ``gp.apply``'s default, which copies the model inside the timed call.
    """
    import copy

    import graphprune as gp

    times = []
    for _ in range(repeats):
        work = copy.deepcopy(model) if inplace else model
        t0 = time.perf_counter()
        res["stage"] = "plan"
        plan = gp.plan(work, {"input_ids": ids}, ratio=ratio, heads=heads)
        res["stage"] = "apply"
        slim = gp.apply(work, plan, inplace=inplace)
        times.append(time.perf_counter() - t0)
    return slim, plan, times


def worker_graphprune(args, layers) -> dict:
    """Prune one LLaMA config with graphprune and check the result; never raises."""
    import graphprune as gp

    res = blank(f"llama-{layers}L", "graphprune")
    try:
        model, ids = build(args, layers)
        logits(model, ids)
        res["rss_model_mb"] = rss_mb()
        slim, plan, res["times"] = _gp_prune(model, ids, args.ratio, args.heads, args.repeats, res)
        res["time"] = statistics.median(res["times"])
        res["rss_peak_mb"] = rss_mb()
        res["groups"] = {k: sum(g.kind == k for g in plan.groups) for k in ("channel", "head")}
        check_model(model, slim, ids, res, gp_reload=True)
        res["stage"] = "verify"
        report = gp.verify(model, slim, plan, {"input_ids": ids})
        res["verified"], res["verify_note"] = report.exact, f"{'exact' if report.exact else 'lossy'}, " \
                                                             f"max |diff| {report.max_abs_diff:.1e}"
        res["stage"] = "plan+apply (MLP only)"  # the same target as TP's fallback, for the time ratio
        res["time_mlp"] = statistics.median(_gp_prune(model, ids, args.ratio, 0.0, args.repeats, res)[2])
        res["capture"] = plan.meta.get("capture")
        res["stage"] = "plan+apply (copying)"
        res["time_copying"] = statistics.median(_gp_prune(model, ids, args.ratio, args.heads, args.repeats, res,
                                                          inplace=False)[2])
        if args.export_capture:  # what capture alone cost before the recorder (torch.export)
            from graphprune.capture.torch_export import capture_export

            res["stage"] = "torch.export capture"
            t0 = time.perf_counter()
            capture_export(model, {"input_ids": ids})
            res["time_export_capture"] = time.perf_counter() - t0
        res["ok"], res["stage"] = bool(report.exact), None
    except Exception as err:  # every failure is a data point
        if res["stage"] == "verify":
            res["verified"] = False
        res["error"] = one_line(res["stage"], err)
    return res


# ----------------------------------------------------------------------------- Torch-Pruning worker

class Diverged(RuntimeError):
    """Torch-Pruning's group search produced a channel index no tensor of the model has."""


@contextlib.contextmanager
def tp_watchdog(model, enabled: bool = True, factor: int = 4):
    """Stop TP's dependency walk once an index exceeds ``factor`` x the widest tensor dimension.

    ``Group.add_dep`` is wrapped to look at every 64th item; nothing else in TP changes.
    """
    from torch_pruning.dependency.group import Group

    if not enabled:
        yield
        return
    limit = factor * max(max(p.shape) for p in model.parameters())
    original = Group.add_dep

    def add_dep(self, dep, idxs):
        original(self, dep, idxs)
        n = len(self._group)
        if n % 64 == 0:
            top = max((int(getattr(i, "idx", i)) for i in idxs), default=0)
            if top >= limit:
                raise Diverged(f"group of {self._group[0].dep.target.name.split(' ')[0]} did not close: index "
                               f"mapping reached channel {top} (widest tensor {limit // factor}) after {n} "
                               f"steps, going {dep.source.name} -> {dep.target.name}")

    Group.add_dep = add_dep
    try:
        yield
    finally:
        Group.add_dep = original


def tp_recipe(model, ratio: float, heads: float, importance=None) -> dict:
    """``MetaPruner`` keyword arguments of TP's LLM example; ``heads=0``: attention left alone."""
    import torch_pruning as tp

    cfg, attn = model.config, [layer.self_attn for layer in model.model.layers]
    kwargs = {"importance": importance or tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
              "global_pruning": False, "pruning_ratio": ratio, "round_to": 4,
              "output_transform": lambda out: out.logits,
              "ignored_layers": [model.lm_head, model.model.embed_tokens]}
    if not heads:
        kwargs["ignored_layers"] += attn
        return kwargs
    num_heads = {}
    for a in attn:
        num_heads[a.q_proj] = cfg.num_attention_heads
        num_heads[a.k_proj] = num_heads[a.v_proj] = cfg.num_key_value_heads
    return dict(kwargs, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=heads)


def tp_fixup(model) -> None:
    """The example's hand-written attribute / config update after pruning (hidden width kept)."""
    cfg = model.config
    for layer in model.model.layers:
        a = layer.self_attn
        heads, kv = a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim
        a.num_key_value_groups = heads // kv
        cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv
        cfg.intermediate_size = layer.mlp.gate_proj.out_features


def _tp_run(model, ids, ratio, heads, res, watchdog=True, importance=None):
    """One TP pruning of ``model`` in place: MetaPruner, step, attribute update."""
    import torch_pruning as tp

    res["stage"] = "MetaPruner"
    with tp_watchdog(model, watchdog):
        pruner = tp.pruner.MetaPruner(model, ids, **tp_recipe(model, ratio, heads, importance))
        res["stage"] = "step"
        for group in pruner.step(interactive=True):
            group.prune()
    res["stage"] = "attribute update"
    tp_fixup(model)


def _tp_prune(model, ids, args, res):
    """Time TP ``args.repeats`` times; when the head recipe diverges, fall back to MLP channels only."""
    import copy

    heads, times, pruned = args.heads, [], None
    while len(times) < args.repeats:
        pruned = copy.deepcopy(model)  # TP prunes in place; copying is not timed
        t0 = time.perf_counter()
        try:
            _tp_run(pruned, ids, args.ratio, heads, res, args.tp_watchdog)
        except Diverged as err:
            if not heads:
                raise
            res["recipe_error"], res["target"], heads = one_line(res["stage"], err), "MLP only", 0.0
            continue
        times.append(time.perf_counter() - t0)
    return pruned, times


def worker_tp(args, layers) -> dict:
    """Prune one LLaMA config with Torch-Pruning's LLM recipe and check the result; never raises."""
    res = blank(f"llama-{layers}L", "torch-pruning")
    try:
        model, ids = build(args, layers)
        logits(model, ids)
        res["rss_model_mb"] = rss_mb()
        pruned, res["times"] = _tp_prune(model, ids, args, res)
        res["time"] = statistics.median(res["times"])
        res["rss_peak_mb"] = rss_mb()
        check_model(model, pruned, ids, res, gp_reload=False)
        res["ok"], res["stage"] = True, None
    except Exception as err:  # every failure is a data point
        res["error"] = one_line(res["stage"], err)
    return res


# ----------------------------------------------------------------------------- 7B on meta

def run_stages(res: dict, stages, state: dict) -> None:
    """Run ``(name, needs, fn)`` stages in order; each gets time, peak RSS and its info or error.

    A stage whose ``needs`` (keys of ``state``) are missing is skipped.  Every stage result is also
    printed at once (``STAGE_MARK``), so a crash keeps what came before it.
    """
    for name, needs, fn in stages:
        row = {"stage": name, "ok": False, "time": None, "rss_mb": None, "info": None, "error": None}
        missing = [k for k in needs if k not in state]
        if missing:
            row["error"] = f"skipped: needs {', '.join(missing)}"
        else:
            t0 = time.perf_counter()
            try:
                row["info"], row["ok"] = fn(), True
            except Exception as err:  # the first failing stage is the finding
                row["error"] = one_line(name, err)
            row["time"], row["rss_mb"] = time.perf_counter() - t0, rss_mb()
        res["stages"].append(row)
        print(STAGE_MARK + json.dumps(row), flush=True)


def _meta_model(args):
    """The Llama-2-7B config built on the meta device, and token ids on meta."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(args, META)).eval()
    return model, torch.zeros((1, args.seq), dtype=torch.long, device="meta")


def meta_graphprune(args) -> dict:
    """How far graphprune gets with the 7B config on meta, stage by stage."""
    import graphprune as gp

    res, st = blank(META, "graphprune", stage=None), {}
    x = lambda: {"input_ids": st["ids"]}  # noqa: E731

    def build_():
        st["model"], st["ids"] = _meta_model(args)
        return f"{count(st['model']) / 1e9:.2f} B parameters, no storage"

    def analyze():
        c = gp.analyze(st["model"], x())
        return f"capture by {c.method}: {len(c.groups)} groups, {len(c.barriers)} barriers"

    def plan(importance):
        def go():
            p = gp.plan(st["model"], x(), ratio=args.ratio, heads=args.heads, importance=importance)
            st["plan"] = p
            return f"{sum(g.kind == 'channel' for g in p.groups)} MLP + {sum(g.kind == 'head' for g in p.groups)} " \
                   f"head groups (includes its own capture)"
        return go

    def apply():
        st["slim"] = gp.apply(st["model"], st["plan"])
        q = st["slim"].model.layers[0].self_attn.q_proj
        return f"params kept {count(st['slim']) / count(st['model']):.1%}; q_proj {q.out_features}x{q.in_features}"

    def config():
        c = st["slim"].config
        shapes = getattr(c, "graphprune_shapes", None) or {}
        return f"intermediate_size {c.intermediate_size}, heads {c.num_attention_heads}/{c.num_key_value_heads}; " \
               f"graphprune_shapes: {len(shapes)} tensors"

    def save():
        with tempfile.TemporaryDirectory() as tmp:
            st["slim"].save_pretrained(tmp)
            return f"{sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / 2**20:.1f} MiB written"

    stages = [("build on meta", [], build_), ("analyze (capture + coupling)", ["model"], analyze),
              ("plan, importance=random", ["model"], plan("random")), ("apply", ["plan"], apply),
              ("forward on meta", ["slim"], lambda: f"logits {tuple(logits(st['slim'], st['ids']).shape)}"),
              ("config after apply", ["slim"], config),
              ("verify", ["slim"], lambda: str(gp.verify(st["model"], st["slim"], st["plan"], x()))),
              ("save_pretrained", ["slim"], save), ("plan, importance=l2 (reads weights)", ["model"], plan("l2"))]
    run_stages(res, stages, st)
    res["ok"] = all(s["ok"] for s in res["stages"])
    return res


def meta_tp(args) -> dict:
    """How far Torch-Pruning gets with the 7B config on meta, stage by stage."""
    import torch_pruning as tp

    res, st, sink = blank(META, "torch-pruning", stage=None), {}, {}

    def build_():
        st["model"], st["ids"] = _meta_model(args)
        return f"{count(st['model']) / 1e9:.2f} B parameters, no storage"

    def graph():
        dg = tp.DependencyGraph().build_dependency(st["model"], st["ids"], output_transform=lambda out: out.logits)
        return f"{len(dg.module2node)} nodes"

    def prune(heads, importance=None, keep=False):
        def go():
            model = _meta_model(args)[0]
            _tp_run(model, st["ids"], args.ratio, heads, sink, args.tp_watchdog, importance)
            if keep:
                st["pruned"] = model
            return f"intermediate {model.model.layers[0].mlp.gate_proj.out_features}, params kept " \
                   f"{count(model) / count(st['model']):.1%}"
        return go

    stages = [("build on meta", [], build_), ("DependencyGraph", ["model"], graph),
              ("MetaPruner + step, LLM recipe (heads, magnitude)", ["model"], prune(args.heads)),
              ("MetaPruner + step, MLP only, magnitude", ["model"], prune(0.0)),
              ("MetaPruner + step, MLP only, RandomImportance", ["model"],
               prune(0.0, tp.importance.RandomImportance(), keep=True)),
              ("forward on meta", ["pruned"], lambda: f"logits {tuple(logits(st['pruned'], st['ids']).shape)}")]
    run_stages(res, stages, st)
    res["ok"] = all(s["ok"] for s in res["stages"])
    return res


def worker(args, tool: str, spec: str) -> dict:
    """Dispatch one (tool, model) job inside the subprocess."""
    import warnings

    warnings.simplefilter("ignore")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if spec == META:
        return (meta_graphprune if tool == "graphprune" else meta_tp)(args)
    return (worker_graphprune if tool == "graphprune" else worker_tp)(args, int(spec))


# ----------------------------------------------------------------------------- driver

def memory_cap(gb: float):
    """A ``preexec_fn`` capping the worker's address space (0: no cap)."""
    limit = int(gb * 2**30)
    return (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))) if gb > 0 else None


def worker_argv(args, tool: str, spec: str) -> list[str]:
    """The command line of one worker subprocess."""
    opts = {"--ratio": args.ratio, "--heads": args.heads, "--repeats": args.repeats, "--threads": args.threads,
            "--hidden": args.hidden, "--num-heads": args.num_heads, "--kv-heads": args.kv_heads,
            "--intermediate": args.intermediate, "--vocab": args.vocab, "--seq": args.seq}
    flags = [str(v) for kv in opts.items() for v in kv]
    return [sys.executable, os.path.abspath(__file__), "--worker", tool, spec, *flags,
            "--tp-watchdog" if args.tp_watchdog else "--no-tp-watchdog"]


def _lines(out) -> list[str]:
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    return (out or "").splitlines()


def run_one(tool: str, spec: str, args) -> dict:
    """Run one worker in a subprocess and turn every way it can die into a result."""
    name = spec if spec == META else f"llama-{spec}L"
    cap = args.meta_mem_gb if spec == META else args.mem_limit_gb
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(worker_argv(args, tool, spec), capture_output=True, text=True, timeout=args.timeout,
                              env=env, preexec_fn=memory_cap(cap))
        out, err, how = _lines(proc.stdout), _lines(proc.stderr), None
    except subprocess.TimeoutExpired as exc:
        out, err, how = _lines(exc.stdout), _lines(exc.stderr), f"timeout: no result after {args.timeout:g} s"
    for line in reversed(out):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    if how is None:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        how = f"crash: {how}: {(err or [''])[-1][:200]}"
    res = blank(name, tool, "timeout" if how.startswith("timeout") else "crash", how)
    res["stages"] = [json.loads(line[len(STAGE_MARK):]) for line in out if line.startswith(STAGE_MARK)]
    return res


def sweep(args) -> None:
    """Run every (model, tool) pair, print progress, write the markdown and JSON."""
    results, start = [], time.perf_counter()
    specs = [str(n) for n in args.layers] + ([] if args.skip_7b else [META])
    for spec in specs:
        for tool in TOOLS:
            r = run_one(tool, spec, args)
            results.append(r)
            what = secs(r["time"]) + " s" if spec != META else \
                f"{sum(s['ok'] for s in r['stages'])}/{len(r['stages'])} stages"
            print(f"{r['model']:12s} {tool:14s} {'ok' if r['ok'] else 'FAIL':4s} {what:>12s} "
                  f"| {time.perf_counter() - start:6.0f}s elapsed", file=sys.stderr, flush=True)
            for msg in filter(None, [r["error"], r["recipe_error"]]):
                print(f"    {msg}", file=sys.stderr, flush=True)
    md = render(results, args, time.perf_counter() - start)
    print(md, end="")
    write_text(args.out, md)
    write_text(args.json, json.dumps(results, indent=1))


# ----------------------------------------------------------------------------- markdown

def parse_args(argv=None) -> argparse.Namespace:
    """Options of the sweep (and of its hidden ``--worker`` mode)."""
    import shlex

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="16,32,48", help="comma-separated decoder depths")
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of MLP channels to remove")
    p.add_argument("--heads", type=float, default=0.25, help="fraction of attention heads to remove")
    p.add_argument("--repeats", type=int, default=1, help="time each tool this many times; the median is reported")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per (model, tool) subprocess")
    p.add_argument("--mem-limit-gb", type=float, default=16, help="address-space cap per small-model worker (0: none)")
    p.add_argument("--meta-mem-gb", type=float, default=12, help="address-space cap of the 7B-on-meta workers")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    for name, default in (("hidden", 256), ("num-heads", 8), ("kv-heads", 4), ("intermediate", 688),
                          ("vocab", 1000), ("seq", 16)):
        p.add_argument(f"--{name}", type=int, default=default, help=f"LLaMA config: {name} (default {default})")
    p.add_argument("--tp-watchdog", action=argparse.BooleanOptionalAction, default=True,
                   help="stop TP's group search when its indices outgrow every tensor (default on)")
    p.add_argument("--skip-7b", action="store_true", help="leave out the Llama-2-7B config on meta")
    p.add_argument("--export-capture", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch.export capture alone (the pre-recorder path), for reference")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "transformers.md"))
    p.add_argument("--json", default=None, help="also write the raw results as JSON here")
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    args.command = shlex.join(["python", "benchmarks/llama.py", *argv])
    args.layers = [int(n) for n in str(args.layers).split(",") if n.strip()]
    if args.repeats < 1 or not 0 <= args.ratio < 1 or not 0 <= args.heads < 1:
        p.error("--repeats must be >= 1, --ratio and --heads in [0, 1)")
    return args


def main(argv=None) -> None:
    sys.path.insert(0, ROOT)
    args = parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(worker(args, *args.worker)), flush=True)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
