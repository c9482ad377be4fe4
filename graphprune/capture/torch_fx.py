"""Capture a PyTorch model into the IR.

torch.fx symbolic tracing with shape propagation on the example inputs is
tried first; models fx cannot trace are captured with ``torch.export`` (see
:mod:`graphprune.capture.torch_export`).  Parameters keep the qualified names
of ``named_parameters()`` / ``named_buffers()``.  The user's model is never
modified: tracing reads it, shape propagation runs it under ``no_grad``.
Attention modules whose layout a rule knows (``nn.MultiheadAttention``, timm
``Attention`` / ``WindowAttention``, torchvision ``ShiftedWindowAttention``;
see :func:`~graphprune.capture.torch_ops.is_leaf_attention`) are leaves of
the trace: one op each, so their heads can be pruned whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import CaptureError
from ..ir import Graph
from .torch_ops import function_handler, is_leaf_attention, method_handler, module_handler


@dataclass
class Captured:
    """The IR plus what later stages need from the frontend."""

    graph: Graph
    method: str  # "fx" or "export"


def as_args(inputs) -> tuple[tuple, dict]:
    """Normalise example inputs: a tensor, a tuple/list of tensors, or a dict."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise CaptureError(f"example inputs must be a tensor, a tuple of tensors or a dict, got {type(inputs).__name__}")


class _FxContext:
    """Builds IR nodes from fx nodes; handed to the normalisation table."""

    def __init__(self, gm: torch.fx.GraphModule, model: torch.nn.Module):
        self.gm = gm
        self.graph = Graph()
        self.env: dict[torch.fx.Node, object] = {}
        self.params = dict(model.named_parameters())
        self.buffers = dict(model.named_buffers())
        self.current: torch.fx.Node | None = None

    # -- helpers used by handlers ---------------------------------------
    def value(self, arg):
        if isinstance(arg, torch.fx.Node):
            v = self.env.get(arg)
            return v if not isinstance(v, tuple) else None
        return None

    def param(self, module_path: str, attr: str):
        name = f"{module_path}.{attr}" if module_path else attr
        return self._param_value(name)

    def _param_value(self, name):
        if name in self.params:
            return self.graph.add_param(name, self.params[name].shape, False, str(self.params[name].dtype))
        if name in self.buffers and self.buffers[name] is not None:
            return self.graph.add_param(name, self.buffers[name].shape, True, str(self.buffers[name].dtype))
        return None

    def rank(self, arg) -> int:
        return len(_meta(arg).shape)

    def out_shapes(self, node):
        meta = node.meta.get("tensor_meta")
        return [tuple(m.shape) for m in meta] if _is_multi(meta) else [tuple(meta.shape)]

    def is_multi(self, arg) -> bool:
        return isinstance(self.env.get(arg), tuple)

    def alias(self, node, src, idx):
        self.env[node] = self.env[src][idx]

    def emit(self, op, inputs, attrs=None):
        node = self.current
        meta = node.meta.get("tensor_meta")
        multi = _is_multi(meta)
        metas = list(meta) if multi else [meta]
        shapes = [tuple(m.shape) if hasattr(m, "shape") else None for m in metas]
        module = node.target if node.op == "call_module" else _module_of(node)
        ir = self.graph.add_node(op, inputs, shapes, name=node.name, attrs=attrs,
                                 source=_describe(node), module=module)
        self.env[node] = tuple(ir.outputs) if multi else ir.outputs[0]


def _meta(arg):
    meta = arg.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise CaptureError(f"no shape for fx node '{arg.name}'")
    return meta


def _module_of(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) else None
    return None


def _describe(node) -> str:
    t = node.target
    name = t if isinstance(t, str) else f"{getattr(t, '__module__', '')}.{getattr(t, '__name__', t)}"
    return f"{node.op} {name}"


def _is_multi(meta) -> bool:
    """A tuple of results (``TensorMetadata`` itself is a NamedTuple)."""
    return isinstance(meta, (tuple, list)) and not hasattr(meta, "shape")


def _is_tensor_meta(meta) -> bool:
    if _is_multi(meta):
        return any(hasattr(m, "shape") for m in meta)
    return meta is not None and hasattr(meta, "shape")


class _Tracer(torch.fx.Tracer):
    """fx's tracer, with the known attention modules as leaves."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return is_leaf_attention(m) or super().is_leaf_module(m, module_qualified_name)


def _symbolic_trace(model: torch.nn.Module, concrete_args=None) -> torch.fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model, concrete_args=concrete_args)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def trace_fx(model: torch.nn.Module, inputs) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` and propagate shapes of ``inputs``."""
    args, kwargs = as_args(inputs)
    if kwargs:
        concrete = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        gm = _symbolic_trace(model, concrete_args=concrete or None)
        args = tuple(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    else:
        gm = _symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    return gm


def fx_to_ir(gm: torch.fx.GraphModule, model: torch.nn.Module) -> Graph:
    """Translate a shape-propagated GraphModule into the IR."""
    ctx = _FxContext(gm, model)
    for node in gm.graph.nodes:
        ctx.current = node
        meta = node.meta.get("tensor_meta")
        if node.op == "placeholder":
            if _is_tensor_meta(meta):
                ctx.env[node] = ctx.graph.add_input(node.name, meta.shape, str(meta.dtype))
        elif node.op == "get_attr":
            v = ctx._param_value(node.target)
            if v is None and _is_tensor_meta(meta):
                v = ctx.graph.add_input(f"const:{node.target}", meta.shape, str(meta.dtype))
            ctx.env[node] = v
        elif node.op == "output":
            outs: list = []
            torch.fx.node.map_arg(node.args[0], outs.append)
            ctx.graph.set_outputs([ctx.env[n] for n in outs if isinstance(ctx.env.get(n), object)
                                   and ctx.env.get(n) is not None and not isinstance(ctx.env[n], tuple)])
        elif _is_tensor_meta(meta):
            _translate(ctx, node)
    return ctx.graph


def _translate(ctx: _FxContext, node) -> None:
    if node.op == "call_module":
        module_handler(ctx, node, ctx.gm.get_submodule(node.target))
        return
    handler = function_handler(node.target) if node.op == "call_function" else method_handler(node.target)
    if handler is None:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        args = [ctx.value(a) for a in node.args if isinstance(a, torch.fx.Node)]
        ctx.emit(f"torch:{name}", args)
    else:
        handler(ctx, node)


def capture_torch(model: torch.nn.Module, inputs) -> Captured:
    """torch.fx first, then a recorded eager forward, then torch.export;
    :class:`CaptureError` names every failure.

    fx keeps the model's own sizes symbolic; the recorder and export bake
    them in (one path, literal sizes) and share one translator.  The
    recorder refuses data-dependent control flow and aliased in-place
    writes, which export then decides or refuses.
    """
    try:
        gm = trace_fx(model, inputs)
    except CaptureError:
        raise
    except Exception as fx_err:  # fx raises many types for untraceable code
        from .torch_export import capture_export, capture_record

        try:
            return Captured(capture_record(model, inputs), "record")
        except Exception as rec_err:  # noqa: BLE001 - any failure of the recorder falls back to export
            try:
                return Captured(capture_export(model, inputs), "export")
            except Exception as ex_err:
                raise CaptureError(
                    f"cannot capture {type(model).__name__}: torch.fx failed ({_short(fx_err)}); "
                    f"recording failed ({_short(rec_err)}); torch.export failed ({_short(ex_err)})") from ex_err
    return Captured(fx_to_ir(gm, model), "fx")


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
