"""onnxruntime CPU latency of dense vs pruned ONNX files, side by side.

For each model (ResNet-50, MobileNetV2, ViT-B/16 by default) the dense file
is exported once (TorchScript exporter, 224x224, batch 1) and pruned by
``gp.prune_onnx`` at several channel ratios.  Dense and pruned sessions use
the same options (``--threads`` intra-op threads, sequential execution,
all graph optimisations) and are timed in interleaved rounds so machine
noise hits both alike; the median per session is reported.  The figure of
merit is ``latency kept / MACs kept``: 1.0 means latency falls exactly as
much as MACs do.

    python benchmarks/onnx_latency.py                       # all three, ratios 0.15,0.3,0.5
    python benchmarks/onnx_latency.py --models resnet50 --ratios 0.3 --round-to 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
from common import write_text  # noqa: E402  (benchmarks/ is not a package)

import graphprune as gp
from graphprune.zoo import build, lively_init


def export(name: str, folder: str) -> tuple[str, dict]:
    torch.manual_seed(0)
    model, x = build(f"torchvision:{name}")
    lively_init(model)
    path = os.path.join(folder, f"{name}.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["y"], opset_version=17)
    return path, {"x": x.numpy()}


def make_session(model, threads: int):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def interleaved_medians(sessions: list, feeds: dict, rounds: int, per_round: int = 3) -> list[float]:
    """Median seconds per run of each session, timed round-robin."""
    times: list[list[float]] = [[] for _ in sessions]
    for s in sessions:  # warm-up
        for _ in range(3):
            s.run(None, feeds)
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            for _ in range(per_round):
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def bench_model(name: str, ratios: list[float], round_to: int, threads: int, rounds: int, folder: str) -> list[dict]:
    path, x = export(name, folder)
    macs0 = gp.count_macs_onnx(path, x)
    slims = []
    for r in ratios:
        plan = gp.plan_onnx(path, ratio=r, round_to=round_to, inputs=x)
        slim = gp.apply_onnx(path, plan, inputs=x)
        report = gp.verify_onnx(path, slim, plan, x)
        slims.append((r, slim, gp.count_macs_onnx(slim, x) / macs0, report))
    sessions = [make_session(path, threads)] + [make_session(s, threads) for _, s, _, _ in slims]
    med = interleaved_medians(sessions, x, rounds)
    rows = [{"model": name, "ratio": 0.0, "macs_kept": 1.0, "latency_ms": med[0] * 1e3, "latency_kept": 1.0,
             "lat_per_mac": 1.0, "oracle": "dense"}]
    for (r, _, mk, rep), t in zip(slims, med[1:]):
        lk = t / med[0]
        rows.append({"model": name, "ratio": r, "macs_kept": mk, "latency_ms": t * 1e3, "latency_kept": lk,
                     "lat_per_mac": lk / mk, "oracle": "exact" if rep.exact else f"{len(rep.lossy_groups)} lossy"})
    return rows


def table(rows: list[dict], threads: int, round_to: int) -> str:
    out = [f"onnxruntime {ort.__version__} CPU, {threads} intra-op thread(s), batch 1, 224x224, "
           f"round_to={round_to}; medians of interleaved runs",
           "",
           "| model | channel ratio removed | MACs kept | latency (ms) | latency kept | latency/MACs | oracle |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['ratio']:.2f} | {r['macs_kept']:.3f} | {r['latency_ms']:.2f} | "
                   f"{r['latency_kept']:.3f} | {r['lat_per_mac']:.2f} | {r['oracle']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,mobilenet_v2,vit_b_16")
    p.add_argument("--ratios", default="0.15,0.3,0.5", help="fractions of each group's channels to remove")
    p.add_argument("--round-to", type=int, default=8, help="keep channel counts multiples of this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (3 runs each)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            rows += bench_model(name, ratios, args.round_to, args.threads, args.rounds, folder)
            print(f"done {name}", file=sys.stderr, flush=True)
    text = table(rows, args.threads, args.round_to)
    print(text)
    write_text(args.out, text)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
