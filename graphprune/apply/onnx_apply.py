"""Apply a :class:`PruningPlan` to an ONNX model.

The model is normalised and captured again (deterministically, so labels
agree with the plan), the plan's removed positions are turned into removed
channel units, and every value axis gets its new width: the number of its
positions that keep at least one unit.  Then:

* float initializers are sliced along the planned axes;
* shape-carrying constants and attributes recorded at capture (reshape
  targets, split sizes, slice bounds, ``group``, expand shapes) are rewritten
  from the new widths;
* stale ``value_info`` is dropped and unused initializers removed.

The result keeps opset, metadata and graph I/O, and passes
``onnx.checker.check_model(full_check=True)``.  The input model is untouched.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..capture.onnx_capture import capture_onnx
from ..coupling.groups import run_rules
from ..coupling.widths import NewWidths, removed_units
from ..errors import PlanError
from ..planning.plan import PruningPlan


def removed_roots(st, plan: PruningPlan, inits: dict) -> np.ndarray:
    """Units the plan removes; :class:`PlanError` if it names what is not there."""
    for (name, axis), removed in plan.removals().items():
        if name not in inits:
            raise PlanError(f"plan names initializer '{name}', which the model does not have")
        dims = tuple(inits[name].dims)
        if axis >= len(dims) or (removed and max(removed) >= dims[axis]):
            raise PlanError(f"plan does not fit initializer '{name}' of shape {dims} (axis {axis})")
    return removed_units(st, plan)


class IntEdits:
    """Pending edits of integer initializers, written once at the end."""

    def __init__(self, inits: dict):
        self.inits = inits
        self.arrays: dict[str, np.ndarray] = {}

    def set(self, ref: tuple, value: int) -> None:
        name, idx = ref
        if name not in self.arrays:
            self.arrays[name] = numpy_helper.to_array(self.inits[name]).copy()
        self.arrays[name].reshape(-1)[idx] = value

    def write(self) -> None:
        for name, arr in self.arrays.items():
            self.inits[name].CopyFrom(numpy_helper.from_array(arr, name))


def _slice_initializers(plan: PruningPlan, inits: dict) -> None:
    for (name, axis), removed in plan.removals().items():
        if not removed:
            continue
        arr = numpy_helper.to_array(inits[name])
        arr = np.delete(arr, sorted(removed), axis=axis)
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))


# -- rewrites of shape-carrying sites (one per kind) --------------------------

def _rw_reshape(node, rw, w: NewWidths, edits: IntEdits, opset) -> None:
    for i, e in enumerate(rw["elems"]):
        if e.kind == "const" and e.value not in (0, -1):
            new = w.size(rw["out"], i)
            if new != e.value:
                edits.set(e.ref, new)


def _rw_expand(node, rw, w, edits, opset) -> None:
    for i, e in enumerate(rw["elems"]):
        if e.kind == "const" and e.value != 1:
            new = w.size(rw["out"], rw["lead"] + i)
            if new != e.value:
                edits.set(e.ref, new)


def _rw_group(node, rw, w, edits, opset) -> None:
    out = rw["out"]
    new = w.size(out, 1)
    if new != out.shape[1]:
        _set_attr(node, "group", rw["groups"] * new // out.shape[1])


def _rw_split(node, rw, w, edits, opset) -> None:
    axis = rw["axis"]
    old = [o.shape[axis] for o in rw["outs"]]
    new = [w.size(o, axis) for o in rw["outs"]]
    if new == old:
        return
    if opset < 13:
        _set_attr(node, "split", new)
        return
    _drop_attr(node, "num_outputs")
    _drop_attr(node, "split")
    name = f"{node.output[0]}__gp_split"
    edits.inits[name] = numpy_helper.from_array(np.array(new, dtype=np.int64), name)
    while len(node.input) < 2:
        node.input.append("")
    node.input[1] = name


def _rw_split_input(node, rw, w, edits, opset) -> None:
    axis = rw["axis"]
    for piece, out in enumerate(rw["outs"]):
        new = w.size(out, axis)
        if new != out.shape[axis]:
            edits.set((rw["input"], piece), new)


def _rw_slice(node, rw, w, edits, opset) -> None:
    x, out = rw["x"], rw["out"]
    for k, axis in enumerate(rw["axes"]):
        start, stop, _ = rw["norm"][k]
        kept = w.kept(x, axis)
        if kept.all():
            continue
        new_start = int(kept[:start].sum())
        if new_start != rw["starts"][k].value:
            edits.set(rw["starts"][k].ref, new_start)
        if stop < x.shape[axis]:
            edits.set(rw["ends"][k].ref, new_start + w.size(out, axis))


def _set_attr(node, name, value) -> None:
    _drop_attr(node, name)
    node.attribute.append(helper.make_attribute(name, value))


def _drop_attr(node, name) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)


REWRITES = {"reshape": _rw_reshape, "expand": _rw_expand, "group": _rw_group, "slice": _rw_slice}


class OnnxRewriter:
    """Applies plans to one ONNX model; the capture and coupling are computed
    once, on first use, and every :meth:`apply` works on a fresh copy."""

    def __init__(self, model: onnx.ModelProto, inputs=None):
        self.model = model
        self.inputs = inputs
        self._prepared = None

    def _prepare(self):
        if self._prepared is None:
            cap = capture_onnx(self.model, self.inputs)
            self._prepared = (cap, run_rules(cap.graph))
        return self._prepared

    def apply(self, plan: PruningPlan, check: bool = True) -> onnx.ModelProto:
        """Return a new, smaller ``ModelProto`` (the model given is not modified)."""
        cap, st = self._prepare()
        m = onnx.ModelProto()
        m.CopyFrom(cap.model)
        inits = {t.name: t for t in m.graph.initializer}
        widths = NewWidths(st, removed_roots(st, plan, inits))
        _slice_initializers(plan, inits)
        edits = IntEdits(inits)
        opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)
        for rw in cap.rewrites:
            node = m.graph.node[rw["node"]]
            fn = REWRITES.get(rw["kind"])
            if rw["kind"] == "split":
                fn = _rw_split_input if rw["input"] else _rw_split
            fn(node, rw, widths, edits, opset)
        edits.write()
        _finish(m, inits)
        if check:
            onnx.checker.check_model(m, full_check=True)
        return m


def apply_onnx(model: onnx.ModelProto, plan: PruningPlan, inputs=None, check: bool = True) -> onnx.ModelProto:
    """Return a new, smaller ``ModelProto`` (``model`` is not modified)."""
    return OnnxRewriter(model, inputs).apply(plan, check)


def _finish(m: onnx.ModelProto, inits: dict) -> None:
    """New initializers in, unused ones out, stale value_info dropped."""
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    del m.graph.initializer[:]
    m.graph.initializer.extend(t for name, t in inits.items() if name in used)
    del m.graph.value_info[:]
