"""Command line: ``graphprune prune``, ``inspect``, ``fold`` and ``blocks``.

Errors print one line (``graphprune: error: ...``) and exit with status 2;
no traceback unless ``GRAPHPRUNE_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .atomic import atomic_path
from .errors import GraphPruneError
from .zoo import DEFAULT_MODEL


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphprune", description="Make trained networks physically smaller.")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prune", help="prune a model, verify it with the oracle and save it")
    pr.add_argument("source", nargs="?", help="an .onnx file to prune (default: --model)")
    pr.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    budget = pr.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, default=None,
                        help="fraction of each group's channels to remove (default 0.5)")
    budget.add_argument("--macs", type=float, default=None, help="keep this fraction of the MACs (e.g. 0.5)")
    budget.add_argument("--params", type=float, default=None, help="keep this fraction of the parameters")
    budget.add_argument("--latency", type=float, default=None,
                        help="keep this fraction of the measured onnxruntime layer latency (PyTorch models)")
    pr.add_argument("--importance", default="l2", help="importance criterion (l1, l2, random)")
    pr.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of this")
    pr.add_argument("--keep-classifier", action="store_true", default=True, help=argparse.SUPPRESS)
    pr.add_argument("-o", "--out", default=None,
                    help="where to write the pruned model (default slim.pt, or <source>.slim.onnx)")
    pr.add_argument("--export-onnx", default=None, metavar="PATH",
                    help="also export the pruned PyTorch model to ONNX (BatchNorm folded, parity-checked)")
    pr.add_argument("--strict", action="store_true", help="fail on ops without a coupling rule")
    ins = sub.add_parser("inspect", help="list the coupled groups of a model")
    ins.add_argument("source", nargs="?", help="an .onnx file to inspect (default: --model)")
    ins.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    ins.add_argument("--all", action="store_true", help="also list groups that cannot be pruned")
    _fold_parser(sub)
    _blocks_parser(sub)
    return p


def _fold_parser(sub) -> None:
    fo = sub.add_parser("fold", help="fold BatchNorms and adjacent linear layers (LayerFold), verify and save")
    fo.add_argument("source", nargs="?", help="an .onnx file to fold (or use --model)")
    fo.add_argument("--model", default=None, help="a PyTorch model spec instead, e.g. torchvision:resnet18")
    fo.add_argument("-o", "--out", default=None,
                    help="where to write the folded model (default <source>.folded.onnx, or folded.pt)")
    fo.add_argument("--linearise", nargs="+", action="extend", default=[], metavar="NAME",
                    help="activation nodes (ONNX node names, or fx names for --model) to treat as identity")
    fo.add_argument("--force", action="store_true",
                    help="also fold pairs that are exact only away from the border (moved padding); "
                         "their error is measured and printed")
    fo.add_argument("--allow-costlier", action="store_true",
                    help="fold pairs even where the merged layer costs more MACs than the two it replaces")


def _blocks_parser(sub) -> None:
    bl = sub.add_parser("blocks", help="rank residual blocks by Block Influence or loss; remove the K least useful")
    bl.add_argument("source", nargs="?", help="an .onnx file (or use --model)")
    bl.add_argument("--model", default=None, help="a PyTorch model spec instead, e.g. torchvision:resnet18")
    bl.add_argument("--method", default="cosine", help="cosine (Block Influence, default) or loss")
    bl.add_argument("--remove", type=int, default=None, metavar="K",
                    help="remove the K lowest-scoring blocks and write the result (default: only rank them)")
    bl.add_argument("-o", "--out", default=None,
                    help="where to write the model with blocks removed (default <source>.shallow.onnx, or "
                         "shallow.pt)")
    bl.add_argument("--report", default=None, metavar="PATH", help="also write the ranked report as JSON")


def fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _is_onnx(args) -> bool:
    if args.source is None:
        return False
    if not args.source.endswith(".onnx"):
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(f"expected an .onnx file, got '{args.source}' (use --model for torchvision specs)")
    return True


def cmd_prune(args) -> int:
    if _is_onnx(args):
        from .cli_onnx import prune_onnx_file

        return prune_onnx_file(args)
    import torch

    import graphprune as gp
    from graphprune.zoo import build

    args.out = args.out or "slim.pt"
    model, x = build(args.model)
    print(f"model      {args.model}  ({type(model).__name__})")
    t0 = time.perf_counter()
    plan = gp.plan(model, x, ratio=args.ratio, importance=args.importance, round_to=args.round_to,
                   strict=args.strict, macs=args.macs, params=args.params, latency=args.latency)
    slim = gp.apply(model, plan)
    took = time.perf_counter() - t0
    p0, p1 = gp.count_params(model), gp.count_params(slim)
    m0, m1 = gp.count_macs(model, x), gp.count_macs(slim, x)
    print(f"plan       {plan.summary()}  in {took:.2f}s")
    print(f"params     {fmt(p0)} -> {fmt(p1)}  ({p1 / p0:.1%} kept)")
    print(f"MACs       {fmt(m0)} -> {fmt(m1)}  ({m1 / m0:.1%} kept)")
    report = gp.verify(model, slim, plan, x)
    print(f"oracle     max |output diff| {report.max_abs_diff:.3g} vs the zeroed original "
          f"(output scale {report.scale:.3g}): OK")
    if report.lossy_groups:
        print(f"lossy      {len(report.lossy_groups)} groups cross LayerNorm/attention statistics; "
              f"they move outputs by up to {report.lossy_max_abs_diff:.3g}")
    with atomic_path(args.out) as tmp:
        torch.save(slim, tmp)
    plan_path = os.path.splitext(args.out)[0] + ".plan.json"
    with open(plan_path, "w") as f:
        f.write(plan.to_json(indent=1))
    print(f"wrote      {args.out} (torch.save of the module) and {plan_path}")
    if args.export_onnx:
        info = gp.export_onnx(slim, x, args.export_onnx)
        print(f"exported   {args.export_onnx} ({info['folded_batchnorms']} BatchNorms folded; onnxruntime "
              f"matches PyTorch to {info['max_abs_diff']:.3g})")
    return 0


def cmd_inspect(args) -> int:
    import graphprune as gp

    if _is_onnx(args):
        coupling = gp.analyze_onnx(args.source)
        what = args.source
    else:
        from graphprune.zoo import build

        model, x = build(args.model)
        coupling = gp.analyze(model, x)
        what = args.model
    print(f"{what}: {len(coupling.groups)} groups, captured with {coupling.method}")
    print(f"{'id':>4} {'kind':8} {'width':>6} {'prunable':>8} {'members':>7}  producer / why not")
    for g in coupling.groups:
        if not g.n_prunable and not args.all:
            continue
        prod = g.producer()
        why = "" if g.n_prunable == g.width else f"  [{'; '.join(g.reasons)[:110]}]"
        lossy = " (lossy)" if g.lossy else ""
        print(f"{g.id:>4} {g.kind:8} {g.width:>6} {g.n_prunable:>8} {len(g.members):>7}  "
              f"{prod.param if prod else g.members[0].param}{lossy}{why}")
    for b in coupling.barriers:
        print(f"barrier: {b}")
    return 0


def cmd_fold(args) -> int:
    from .errors import InvalidArgumentError

    if args.source is not None and args.model is not None:
        raise InvalidArgumentError("fold takes an .onnx file or --model, not both")
    if _is_onnx(args):
        from .cli_onnx import fold_onnx_file

        return fold_onnx_file(args)
    if args.model is None:
        raise InvalidArgumentError("fold needs an .onnx file or --model SPEC (e.g. torchvision:resnet18)")

    from graphprune.layerfold import fold
    from graphprune.zoo import build

    out = args.out or "folded.pt"
    model, x = build(args.model)
    print(f"model      {args.model}  ({type(model).__name__})")
    folded, report = fold(model, x, linearise=args.linearise, force=args.force,
                          only_if_cheaper=not args.allow_costlier)
    print_fold_report(report)
    _save_module(folded, out)
    return 0


def _save_module(module, out: str) -> None:
    """``torch.save`` atomically: the file appears complete or not at all."""
    import torch

    with atomic_path(out) as tmp:
        torch.save(module, tmp)
    print(f"wrote      {out} (torch.save of the module)")


def cmd_blocks(args) -> int:
    from .errors import InvalidArgumentError

    if args.source is not None and args.model is not None:
        raise InvalidArgumentError("blocks takes an .onnx file or --model, not both")
    if args.out is not None and args.remove is None:
        raise InvalidArgumentError("-o is only written with --remove K")
    if _is_onnx(args):
        from .cli_onnx import blocks_onnx_file

        return blocks_onnx_file(args)
    if args.model is None:
        raise InvalidArgumentError("blocks needs an .onnx file or --model SPEC (e.g. torchvision:resnet18)")

    from graphprune.layerfold.blocks import block_report, remove_blocks
    from graphprune.zoo import build

    model, x = build(args.model)
    print(f"model      {args.model}  ({type(model).__name__})")
    report = block_report(model, [x], method=args.method)
    slim = remove_blocks(model, report, k=args.remove, example_inputs=x) if args.remove is not None else None
    print_block_report(report, args.remove or 0, "one random batch")
    if slim is not None:
        _save_module(slim, args.out or "shallow.pt")
    write_block_report(report, args.report)
    return 0


def print_block_report(report, removed: int, data: str) -> None:
    """The ranking of ``graphprune blocks``: rank, score, parameters, shape, name, and which go."""
    what = "Block Influence, 1 - cos(x, y)" if report.method == "cosine" else "output MSE with the block skipped"
    print(f"blocks     {len(report)} residual blocks scored by {report.method} ({what}) on {data}")
    print(f"{'rank':>6} {'score':>10} {'params':>8}  {'shape':18} block")
    for i, e in enumerate(report):
        mark = "  -> removed" if i < removed else ""
        print(f"{i + 1:>6} {e.score:>10.4g} {fmt(e.params):>8}  {str(list(e.in_shape)):18} {e.name}  "
              f"({e.type}){mark}")


def write_block_report(report, path: str | None) -> None:
    if path:
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write(report.to_json(indent=1))
        print(f"report     {path}")


def print_fold_report(report, limit: int = 12) -> None:
    """The fold summary of ``graphprune fold``: folds by kind, refusals with reasons, depth, MACs, check."""
    plan = report.plan
    kinds = {}
    for step in plan.folds:
        key = step.kind + (f"/{step.where}" if step.where else "")
        kinds[key] = kinds.get(key, 0) + 1
    print(f"folded     {', '.join(f'{n} {k}' for k, n in kinds.items()) or 'nothing'}"
          f"{f' ({len(plan.forced)} forced)' if plan.forced else ''}")
    for step in plan.refused[:limit]:
        print(f"refused    {step.kind} {' + '.join(step.modules)}: {step.reason}")
    if len(plan.refused) > limit:
        print(f"refused    ... and {len(plan.refused) - limit} more")
    if "nodes_before" in plan.meta:
        print(f"nodes      {plan.meta['nodes_before']} -> {plan.meta['nodes_after']}")
    print(f"depth      {report.depth_before} -> {report.depth_after} conv/linear layers")
    m0, m1 = report.macs_before, report.macs_after
    print(f"MACs       {fmt(m0)} -> {fmt(m1)}  ({m1 / max(m0, 1):.1%} kept)")
    print(f"verify     max |output diff| {report.max_abs_diff:.3g} vs the unfolded model "
          f"(tolerance {report.tolerance:.3g}): OK")
    if report.forced_max_abs_diff is not None:
        print(f"forced     forced folds change outputs by up to {report.forced_max_abs_diff:.3g}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"prune": cmd_prune, "inspect": cmd_inspect, "fold": cmd_fold,
                "blocks": cmd_blocks}[args.command](args)
    except GraphPruneError as err:
        if os.environ.get("GRAPHPRUNE_DEBUG"):
            raise
        print(f"graphprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
