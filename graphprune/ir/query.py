"""Read-only questions about a :class:`~graphprune.ir.graph.Graph`.

Nothing here imports torch or onnx.
"""

from __future__ import annotations

from .graph import Graph, Value

_PASS_THROUGH = ("identity", "dropout")  # ops that forward their first input unchanged (eval mode)


def normalised_sums(graph: Graph) -> dict[str, str]:
    """``{layer weight: norm weight}``: the weight layers whose output reaches
    a ``layer_norm`` as its normalised input only through pass-through ops
    and additions, with every value on the way read exactly once.

    Invariant: the norm's input is then the layer's output plus terms that do
    not depend on it (nothing else reads the layer's output, so no other path
    leads from it to the addends), so changing the layer's weights by ``D``
    changes the norm's input by exactly ``D`` times the layer's input.  Layers
    whose path branches, passes any other op, or ends at a graph output, and
    norms without a weight parameter, are absent.
    """
    outputs = {id(v) for v in graph.outputs}
    out: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in ("linear", "conv") or len(node.inputs) < 2 or _param(node.inputs[1]) is None:
            continue
        v = node.outputs[0]
        while len(v.uses) == 1 and id(v) not in outputs:
            user, idx = v.uses[0]
            if user.op in _PASS_THROUGH and idx == 0 or user.op == "add":
                v = user.outputs[0]
                continue
            if user.op == "layer_norm" and idx == 0 and len(user.inputs) > 1 and _param(user.inputs[1]):
                out[_param(node.inputs[1])] = _param(user.inputs[1])
            break
    return out


def _param(v: Value | None) -> str | None:
    return v.param.name if v is not None and v.param is not None else None
