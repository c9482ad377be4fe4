"""The oracle for ONNX models, run with onnxruntime (see :mod:`.oracle`)."""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnx
from onnx import numpy_helper

from ..apply.onnx_apply import OnnxRewriter
from ..capture.onnx_load import normalise
from ..planning.plan import PruningPlan
from .oracle import VerifyReport, check


def session(model: onnx.ModelProto, threads: int = 0):
    """An onnxruntime CPU session for ``model`` (``threads=0``: runtime default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def median_seconds(sess, feeds: dict, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``sess.run`` on ``feeds`` after ``warmup`` runs."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_onnx(model: onnx.ModelProto, inputs: dict) -> list[np.ndarray]:
    """All outputs of ``model`` on ``inputs``, as float64 arrays."""
    outs = session(model).run(None, inputs)
    return [np.asarray(o, dtype=np.float64) for o in outs]


def zeroed_onnx(original: onnx.ModelProto, plan: PruningPlan) -> onnx.ModelProto:
    """A normalised copy of ``original`` with every removed member slice zeroed."""
    m = onnx.ModelProto()
    m.CopyFrom(original)
    normalise(m)
    inits = {t.name: t for t in m.graph.initializer}
    for g in plan.groups:
        for mem in g.members:
            if mem.is_buffer or not mem.removed or mem.name not in inits:
                continue
            arr = numpy_helper.to_array(inits[mem.name]).copy()
            index = [slice(None)] * arr.ndim
            index[mem.axis] = list(mem.removed)
            arr[tuple(index)] = 0
            inits[mem.name].CopyFrom(numpy_helper.from_array(arr, mem.name))
    return m


class OnnxBackend:
    """Oracle operations on an ONNX ``original`` with fixed ``inputs``."""

    def __init__(self, original: onnx.ModelProto, inputs: dict):
        self.original = original
        self.inputs = inputs
        self.rewriter = OnnxRewriter(original, inputs)

    def apply(self, plan):
        return self.rewriter.apply(plan, check=False)

    def zeroed(self, plan):
        return zeroed_onnx(self.original, plan)

    def run(self, model):
        return run_onnx(model, self.inputs)


def verify_onnx(original: onnx.ModelProto, pruned: onnx.ModelProto, plan: PruningPlan, inputs: dict,
                atol: float = 0.0, rtol: float = 1e-4) -> VerifyReport:
    """Raise :class:`VerificationError` naming the worst group if the check fails."""
    return check(OnnxBackend(original, inputs), pruned, plan, atol=atol, rtol=rtol)
