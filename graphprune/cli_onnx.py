"""``graphprune prune``, ``fold`` and ``blocks`` on an ``.onnx`` file: plan,
apply, verify with onnxruntime, then write the result (only once everything
passed; atomically)."""

from __future__ import annotations

import os
import time

from .cli import fmt, print_block_report, print_fold_report, write_block_report


def prune_onnx_file(args) -> int:
    import graphprune as gp
    from graphprune.capture.onnx_load import load_model
    from graphprune.onnx_api import feeds

    if args.latency is not None:
        from .errors import InvalidArgumentError

        raise InvalidArgumentError("--latency budgets are measured on PyTorch models for now; use --macs for ONNX")
    src = args.source
    out = args.out or os.path.splitext(src)[0] + ".slim.onnx"
    model = load_model(src)
    x = feeds(model)
    print(f"model      {src}")
    t0 = time.perf_counter()
    plan = gp.plan_onnx(model, ratio=args.ratio, importance=args.importance, round_to=args.round_to,
                        strict=args.strict, inputs=x, macs=args.macs, params=args.params)
    slim = gp.apply_onnx(model, plan, inputs=x)
    took = time.perf_counter() - t0
    p0, p1 = gp.count_params_onnx(model), gp.count_params_onnx(slim)
    m0, m1 = gp.count_macs_onnx(model, x), gp.count_macs_onnx(slim, x)
    print(f"plan       {plan.summary()}  in {took:.2f}s")
    for b in plan.meta.get("barriers", [])[:5]:
        print(f"barrier    {b}")
    print(f"params     {fmt(p0)} -> {fmt(p1)}  ({p1 / p0:.1%} kept)")
    print(f"MACs       {fmt(m0)} -> {fmt(m1)}  ({m1 / max(m0, 1):.1%} kept)")
    l0, l1 = gp.latency_onnx(model, x), gp.latency_onnx(slim, x)
    print(f"latency    {l0 * 1e3:.2f} ms -> {l1 * 1e3:.2f} ms  (onnxruntime CPU, 1 thread, median of 20)")
    report = gp.verify_onnx(model, slim, plan, x)
    print(f"oracle     max |output diff| {report.max_abs_diff:.3g} vs the zeroed original "
          f"(output scale {report.scale:.3g}): OK")
    if report.lossy_groups:
        print(f"lossy      {len(report.lossy_groups)} groups cross LayerNorm statistics; "
              f"they move outputs by up to {report.lossy_max_abs_diff:.3g}")
    gp.save_onnx(slim, out)
    plan_path = os.path.splitext(out)[0] + ".plan.json"
    with open(plan_path, "w") as f:
        f.write(plan.to_json(indent=1))
    print(f"wrote      {out} and {plan_path}")
    return 0


def fold_onnx_file(args) -> int:
    """``graphprune fold model.onnx -o shallow.onnx``; the source file is never written."""
    import graphprune as gp
    from graphprune.capture.onnx_load import load_model
    from graphprune.layerfold.onnx_fold import fold_onnx

    from .errors import InvalidArgumentError

    src = args.source
    out = args.out or os.path.splitext(src)[0] + ".folded.onnx"
    if os.path.abspath(out) == os.path.abspath(src):
        raise InvalidArgumentError(f"-o names the input file '{src}': write the folded model elsewhere")
    model = load_model(src)
    print(f"model      {src}")
    t0 = time.perf_counter()
    folded, report = fold_onnx(model, linearise=args.linearise, force=args.force,
                               only_if_cheaper=not args.allow_costlier)
    print(f"plan       {report.plan.summary()}  in {time.perf_counter() - t0:.2f}s")
    print_fold_report(report)
    gp.save_onnx(folded, out)
    print(f"wrote      {out}")
    return 0


def blocks_onnx_file(args) -> int:
    """``graphprune blocks model.onnx [--remove K -o shallow.onnx]``; the source file is never written."""
    import numpy as np

    import graphprune as gp
    from graphprune.capture.onnx_load import load_model, normalise
    from graphprune.layerfold.onnx_blocks import RANDOM_BATCHES, block_report_onnx, remove_blocks_onnx
    from graphprune.onnx_api import feeds
    from graphprune.verify.onnx_verify import run_onnx

    from .errors import InvalidArgumentError

    src = args.source
    out = args.out or os.path.splitext(src)[0] + ".shallow.onnx"
    if args.remove is not None and os.path.abspath(out) == os.path.abspath(src):
        raise InvalidArgumentError(f"-o names the input file '{src}': write the model elsewhere")
    model = load_model(src)
    t0 = time.perf_counter()
    report = block_report_onnx(model, method=args.method)
    slim = remove_blocks_onnx(model, report, k=args.remove) if args.remove is not None else None
    print(f"model      {src}  (scored in {time.perf_counter() - t0:.2f}s)")
    print_block_report(report, args.remove or 0, f"{RANDOM_BATCHES} seeded random feeds")
    if slim is not None:
        base = normalise(load_model(model))  # constants as initializers, as in the result
        adds = [sum(n.op_type == "Add" for n in m.graph.node) for m in (base, slim)]
        print(f"nodes      {len(base.graph.node)} -> {len(slim.graph.node)}  (Add {adds[0]} -> {adds[1]}; "
              f"constants counted as initializers)")
        p0, p1 = gp.count_params_onnx(model), gp.count_params_onnx(slim)
        print(f"params     {fmt(p0)} -> {fmt(p1)}  ({p1 / max(p0, 1):.1%} kept)")
        x = feeds(model)
        want, got = run_onnx(model, x), run_onnx(slim, x)
        diff = max((float(np.abs(a - b).max()) for a, b in zip(want, got) if a.size), default=0.0)
        scale = max((float(np.abs(a).max()) for a in want if a.size), default=0.0)
        print(f"outputs    max |diff| {diff:.3g} on a random feed (output scale {scale:.3g}); shapes unchanged")
        gp.save_onnx(slim, out)
        print(f"wrote      {out}")
    write_block_report(report, args.report)
    return 0
