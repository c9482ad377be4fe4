"""Markdown writer of ``benchmarks/llama.py`` (tables, versions, an honest reading)."""

from __future__ import annotations

import os
import statistics
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

import torch
from common import source_state  # noqa: E402  (benchmarks/ is not a package)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("graphprune", "torch-pruning")


def version(package: str) -> str:
    """Installed version of ``package``, or ``not installed``."""
    try:
        return _version(package)
    except PackageNotFoundError:
        return "not installed"
META = "7b-meta"


def secs(t) -> str:
    return "-" if t is None else f"{t:.2f}"


def pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def flag(v, note=None) -> str:
    """yes / no / - with an optional note."""
    word = "-" if v is None else ("yes" if v else "no")
    return f"{word} ({note})" if note and v is not None else word


def same_target_time(gp_row: dict, tp_row: dict):
    """graphprune's time for the target TP reached: MLP+heads, or MLP only after TP's fallback."""
    return gp_row["time_mlp"] if tp_row["target"] == "MLP only" else gp_row["time"]


def kept_heads(args) -> int:
    """Query heads per layer after removing ``args.heads`` of the KV groups (graphprune's count)."""
    return args.num_heads - int(args.heads * args.kv_heads) * (args.num_heads // args.kv_heads)


def header(args, elapsed: float | None) -> list[str]:
    """Title, command line, versions, threads, date, settings."""


    import graphprune

    took = f"; whole run {elapsed / 60:.1f} min" if elapsed else ""
    return [f"# graphprune vs Torch-Pruning on LLaMA configs (MLP ratio {args.ratio}, heads {args.heads})", "",
            f"Command: `{args.command}`", "",
            f"torch {torch.__version__}, transformers {version('transformers')}, torch-pruning "
            f"{version('torch-pruning')}, graphprune {graphprune.__version__} ({source_state()}); {args.threads} "
            f"torch threads per worker on {os.cpu_count()} CPUs (shared); median of {args.repeats} run(s); "
            f"{time.strftime('%Y-%m-%d %H:%M')}{took}.", "",
            f"Models: `LlamaForCausalLM`, hidden {args.hidden}, {args.num_heads} query / {args.kv_heads} KV heads, "
            f"intermediate {args.intermediate}, vocab {args.vocab}, random init (seed 0), input 1x{args.seq} ids. "
            f"Target: remove {args.ratio:.0%} of the MLP channels and {args.heads:.0%} of the attention heads "
            "(GQA: a KV head with its query heads) of every layer; hidden width kept. TP: the recipe of "
            "`examples/LLMs/prune_llm.py` (see the docstring of this script for the two adaptations and the "
            f"watchdog{'' if args.tp_watchdog else ', off in this run'}).", ""]


def model_table(results) -> list[str]:
    """One row per (model, tool)."""
    head = ["model", "tool", "target reached", "ok", "plan+apply (s)", "RSS model / peak (MiB)", "params kept",
            "runs, logits shape", "from_pretrained = same logits", "gp.load_pretrained", "verify"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r["model"] == META:
            continue
        rss = "-" if r["rss_peak_mb"] is None else f"{r['rss_model_mb']:.0f} / {r['rss_peak_mb']:.0f}"
        shape = "-" if not r["runs"] else ("yes" if r["shape_ok"] else "no: shape differs")
        ok = "yes" if r["ok"] else f"FAIL ({r['stage']})"
        cells = [r["model"], r["tool"], r["target"] if r["times"] else "-", ok, secs(r["time"]), rss,
                 pct(r["params_kept"]), shape,
                 flag(r["config_native"], r["config_native_note"]),
                 flag(r["config_gp"], r["config_gp_note"]), flag(r["verified"], r["verify_note"])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def pairs(results) -> list[tuple[dict, dict]]:
    """(graphprune, torch-pruning) rows of each small model."""
    by = {(r["model"], r["tool"]): r for r in results if r["model"] != META}
    names = dict.fromkeys(r["model"] for r in results if r["model"] != META)
    return [(by[n, TOOLS[0]], by[n, TOOLS[1]]) for n in names if (n, TOOLS[0]) in by and (n, TOOLS[1]) in by]


def ratio_table(results) -> list[str]:
    """Times side by side on the target both tools reached."""
    head = ["model", "gp MLP+heads (s)", "gp MLP only (s)", "TP (s)", "TP target", "TP time / gp time (same target)",
            "gp capture", "gp ms / layer", "gp MLP+heads, copying apply (s)", "torch.export capture alone (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, t in pairs(results):
        ref = same_target_time(g, t)
        ratio = f"{t['time'] / ref:.2f}x" if ref and t["time"] else "-"
        per_layer = f"{1000 * g['time'] / _depth(g['model']):.0f}" if g["time"] else "-"
        lines.append(f"| {g['model']} | {secs(g['time'])} | {secs(g['time_mlp'])} | {secs(t['time'])} | "
                     f"{t['target'] if t['times'] else '-'} | {ratio} | {g.get('capture') or '-'} | {per_layer} | "
                     f"{secs(g.get('time_copying'))} | {secs(g.get('time_export_capture'))} |")
    return lines


def _depth(model: str) -> int:
    """``llama-48L`` -> 48."""
    return int(model.split("-")[-1].rstrip("L"))


def meta_table(results) -> list[str]:
    """The 7B-on-meta stages of each tool."""
    lines = ["| tool | stage | ok | time (s) | peak RSS (MiB) | result |", "|---|---|---|---|---|---|"]
    for r in results:
        if r["model"] != META:
            continue
        if not r["stages"] or r["error"]:
            lines.append(f"| {r['tool']} | (worker) | no | - | - | {r['error']} |")
        for s in r["stages"]:
            rss = "-" if s["rss_mb"] is None else f"{s['rss_mb']:.0f}"
            text = (s["info"] if s["ok"] else s["error"]).replace("|", "\\|")
            lines.append(f"| {r['tool']} | {s['stage']} | {'yes' if s['ok'] else 'no'} | {secs(s['time'])} | "
                         f"{rss} | {text} |")
    return lines


def _spread(values, fmt="{:.0f}") -> str:
    return "-" if not values else f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def reading_small(ps, args) -> list[str]:
    """Reading of the small-model tables, generated from the figures."""
    out = [f"- graphprune reached the full target on {sum(g['ok'] for g, _ in ps)}/{len(ps)} models, oracle exact "
           f"on {sum(bool(g['verified']) for g, _ in ps)}; Torch-Pruning finished {sum(t['ok'] for _, t in ps)}/"
           f"{len(ps)}, on the target in the 'target reached' column."]
    if any(t["recipe_error"] for _, t in ps):
        out.append(f"- TP's head recipe did not finish on {sum(bool(t['recipe_error']) for _, t in ps)}/{len(ps)} "
                   "models: the group search of the attention projections never closes. The concat it cycles "
                   "through is `rotate_half`'s `torch.cat((-x2, x1), -1)` in the rotary embedding; TP takes both "
                   "half-width slices for full-width tensors, so every pass shifts the indices by the concat offset "
                   "and no state repeats (without the watchdog it runs until the timeout; a hang on Qwen3-8B is "
                   "reported as Torch-Pruning issue #527). TP's rows therefore show MLP channels only, and its time "
                   "is compared with graphprune's MLP-only time.")
    ratios = [t["time"] / ref for g, t in ps if (ref := same_target_time(g, t)) and t["time"]]
    if ratios:
        gp_times = _spread([g["time"] for g, _ in ps if g["time"]], "{:.1f}")
        out.append(f"- TP time / graphprune time on the same target: median {statistics.median(ratios):.2f}x (range "
                   f"{_spread(ratios, '{:.2f}')}x). graphprune MLP+heads took {gp_times} s over the depths; wall "
                   "clock on a shared machine, read as rough.")
    per_layer = [1000 * g["time"] / _depth(g["model"]) for g, _ in ps if g["time"]]
    if len(per_layer) > 1:
        out.append(f"- graphprune time per decoder layer: {_spread(per_layer)} ms over depths "
                   f"{', '.join(str(_depth(g['model'])) for g, _ in ps)} (constant per layer = linear in depth).")
    exports = [(g["time_export_capture"], g["time"]) for g, _ in ps if g.get("time_export_capture") and g["time"]]
    if exports:
        took = _spread([e for e, _ in exports], "{:.1f}")
        out.append(f"- torch.export capture alone (the path before the recorder) took {took} s, "
                   f"{_spread([e / t for e, t in exports], '{:.0f}')}x graphprune's whole plan+apply now.")
    extra = {tool: [r["rss_peak_mb"] - r["rss_model_mb"] for pair in ps for r in pair
                    if r["tool"] == tool and r["rss_peak_mb"]] for tool in TOOLS}
    out.append(f"- Memory on top of the built model (peak RSS - RSS after build): graphprune "
               f"{_spread(extra[TOOLS[0]])} MiB, TP {_spread(extra[TOOLS[1]])} MiB.")
    if any(g["config_native"] is False for g, _ in ps):
        out.append(f"- `from_pretrained` cannot rebuild graphprune's model: {kept_heads(args)} query heads do not "
                   f"divide hidden {args.hidden}, which transformers' LlamaConfig validation refuses even with an "
                   "explicit head_dim; graphprune then lists the shapes in `config.graphprune_shapes` and "
                   f"`gp.load_pretrained` reloads exactly ({sum(bool(g['config_gp']) for g, _ in ps)}/{len(ps)}).")
    return out


def reading_meta(results) -> list[str]:
    """Reading of the 7B-on-meta table."""
    out = []
    for r in (r for r in results if r["model"] == META):
        done = [s["stage"] for s in r["stages"] if s["ok"]]
        bad = next((s for s in r["stages"] if not s["ok"]), None)
        peak = max((s["rss_mb"] or 0 for s in r["stages"]), default=0)
        out.append(f"- 7B on meta, {r['tool']}: {len(done)}/{len(r['stages'])} stages ran (peak RSS "
                   f"{peak / 1024:.1f} GiB); first failure: {bad['error'] if bad else r['error'] or 'none'}.")
    if out:
        out.append("- On meta, what reads numbers cannot work: verify compares outputs, save_pretrained writes "
                   "tensors, magnitude importance reads weights. The rows show how far each tool gets before that.")
    return out


def render(results, args, elapsed: float | None = None) -> str:
    """The whole markdown report."""
    lines = header(args, elapsed) + model_table(results) + [""] + ratio_table(results)
    if any(r["model"] == META for r in results):
        lines += ["", f"## Llama-2-7B config on `meta` (no weights; address space capped at {args.meta_mem_gb:g} GiB)",
                  ""] + meta_table(results)
    errors = [f"- {r['model']} / {r['tool']}: {m}" for r in results
              for m in filter(None, [r["error"], r["recipe_error"]])]
    if errors:
        lines += ["", "Failures:", ""] + errors
    lines += ["", "## Reading", ""] + (reading_small(pairs(results), args) if pairs(results) else [])
    lines += reading_meta(results)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line
