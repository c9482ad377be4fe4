"""Capture by recording one eager forward pass (a ``TorchFunctionMode``).

For models torch.fx cannot trace symbolically (Hugging Face transformers,
models that branch on shapes), graphprune runs the model once on the example
inputs and records every torch-level call that reads a tensor derived from an
input, a parameter or a buffer.  Each call is written as a node (:class:`RecNode`, the fields of an fx
node) in the aten form that :mod:`.torch_export`'s translator reads (``F.linear`` ->
``aten.linear``, ``F.embedding(ids, w)`` -> ``aten.embedding(w, ids)``,
``x[..., :k]`` -> ``aten.slice``), so one op table and one reading of
reshapes serve both frontends.  Like an exported program, the record is one
path with every size a literal; unlike export it costs one eager forward
instead of a fake-tensor trace (about 30x less on a LLaMA decoder).

Invariants:

* the model runs once under ``no_grad``; its parameters, buffers and modes
  are not changed;
* a call none of whose tensor arguments is tracked (factories, masks made
  from ``arange``) is not recorded; its results enter the graph as constant
  inputs where a recorded call reads them;
* a call whose result is one of its own inputs (``x.to(x.dtype)``) records
  nothing;
* reading into Python (``bool``, ``item``, ``tolist``...) the *value* of a
  tensor computed from a parameter or buffer, or of any floating-point
  tensor, is data-dependent control flow: :class:`RecordError`, so the
  caller falls back to ``torch.export``, which refuses or decides it
  soundly.  Integer and boolean values computed from the inputs alone (token
  ids, attention masks, positions: Hugging Face's mask and packed-sequence
  checks) are read as the model's own forward reads them on these inputs,
  and every such read is listed in ``Recorded.input_reads``;
* an in-place op records a new version of its target; on a target whose
  storage another tracked tensor shares, it raises :class:`RecordError` (the
  other tensor's node would go stale).
"""

from __future__ import annotations

import operator

import torch
from torch.overrides import TorchFunctionMode, resolve_name

from ..errors import CaptureError


class RecordError(CaptureError):
    """The forward pass cannot be recorded soundly (the caller falls back)."""


_VALUE_READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "__array__",
                "nonzero", "__contains__", "_local_scalar_dense", "unique", "masked_select", "argwhere"}
_DUNDER = {"__add__": "add", "__radd__": "add", "__iadd__": "add_", "__mul__": "mul", "__rmul__": "mul",
           "__imul__": "mul_", "__sub__": "sub", "__rsub__": "rsub", "__isub__": "sub_", "__truediv__": "div",
           "__rtruediv__": "rdiv", "__itruediv__": "div_", "__neg__": "neg", "__pow__": "pow",
           "__matmul__": "matmul", "__rmatmul__": "rmatmul", "__getitem__": "getitem",
           "__setitem__": "index_put_", "__and__": "bitwise_and", "__or__": "bitwise_or",
           "__invert__": "bitwise_not", "__eq__": "eq", "__ne__": "ne", "__lt__": "lt", "__le__": "le",
           "__gt__": "gt", "__ge__": "ge", "__rpow__": "rpow"}
_IDENTITY = {"float", "double", "half", "bfloat16", "detach", "type", "cpu", "data"}
_NAMES: dict = {}


class RecNode:
    """One recorded call: the attributes of an fx node the translator reads
    (a real ``torch.fx.Node`` costs several times more to build)."""

    __slots__ = ("name", "op", "target", "args", "kwargs", "meta")

    def __init__(self, name: str, op: str, target, args: tuple = (), kwargs: dict | None = None):
        self.name, self.op, self.target, self.args = name, op, target, args
        self.kwargs, self.meta = kwargs or {}, {}

    def __repr__(self) -> str:
        return f"RecNode({self.name}: {self.target})"


class _Val:
    """What the translator reads of a recorded tensor: its shape and dtype
    (plain tuples: reading ``Tensor.shape`` again costs more than the op)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype = tuple(t.shape), t.dtype


class RecGraph:
    """The recorded nodes in execution order, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[RecNode] = []
        self._counts: dict[str, int] = {}

    def create_node(self, op: str, target, args: tuple = (), kwargs=None, name: str = "node") -> RecNode:
        k = self._counts.get(name, 0)
        self._counts[name] = k + 1
        node = RecNode(name if k == 0 else f"{name}_{k}", op, target, args, kwargs)
        self.nodes.append(node)
        return node

    def placeholder(self, name: str) -> RecNode:
        return self.create_node("placeholder", name, name=name)

    def output(self, results: tuple) -> RecNode:
        return self.create_node("output", "output", (results,), name="output")


class _Target:
    """An fx call target that reads like the aten op ``name`` to the translator."""

    def __init__(self, name: str):
        self.name = name
        self._overloadpacket = getattr(torch.ops.aten, name, None) if _is_aten(name) else None
        if self._overloadpacket is None:
            self._overloadpacket = type(name, (), {"__name__": name})

    def __str__(self) -> str:
        return f"aten.{self.name}"

    __repr__ = __str__


def _is_aten(name: str) -> bool:
    try:
        return isinstance(getattr(torch.ops.aten, name), torch._ops.OpOverloadPacket)
    except (AttributeError, RuntimeError):
        return False


_TARGETS: dict[str, _Target] = {}


def _target(name: str) -> _Target:
    if name not in _TARGETS:
        _TARGETS[name] = _Target(name)
    return _TARGETS[name]


def _short_name(func) -> str:
    """``torch.Tensor.view`` -> ``view``; ``Tensor.T.__get__`` -> ``T``; dunders mapped to aten names."""
    if func not in _NAMES:
        try:
            full = resolve_name(func) or getattr(func, "__name__", str(func))
        except Exception:  # noqa: BLE001 - an exotic callable: use its name
            full = getattr(func, "__name__", str(func))
        parts = full.split(".")
        name = parts[-2] if parts[-1] == "__get__" and len(parts) > 1 else parts[-1]
        _NAMES[func] = _DUNDER.get(name, name)
    return _NAMES[func]


def leaves(obj, types, out: list) -> list:
    """Every instance of ``types`` in a nest of tuples, lists and dicts (in order), appended to ``out``."""
    if isinstance(obj, types):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            leaves(o, types, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            leaves(o, types, out)
    return out


def _tensors(obj, out: list) -> list:
    return leaves(obj, torch.Tensor, out)


class _Recorder(TorchFunctionMode):
    """Builds an fx graph of aten-form nodes while the model runs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.graph = RecGraph()
        self.node_of: dict[int, RecNode] = {}
        self.keep: list = []  # every tensor seen stays alive, so ids stay unique
        self.storages: dict[int, int] = {}
        self.to_param: dict[str, str] = {}
        self.to_buffer: dict[str, str] = {}
        self.params = {id(p): n for n, p in model.named_parameters()}
        self.buffers = {id(b): n for n, b in model.named_buffers()}
        self.consts = 0
        self.weighted: set[int] = set()  # ids of tensors computed from weights or floating-point data
        self.input_reads: list[str] = []

    # -- tensors and their nodes ------------------------------------------
    def bind(self, t: torch.Tensor, node: RecNode) -> None:
        node.meta["val"] = _Val(t)
        if id(t) not in self.node_of:
            self.keep.append(t)
            key = _storage(t)
            self.storages[key] = self.storages.get(key, 0) + 1
        self.node_of[id(t)] = node

    def input(self, name: str, t: torch.Tensor) -> None:
        self.bind(t, self.graph.placeholder(name))

    def tracked(self, t: torch.Tensor) -> bool:
        return id(t) in self.node_of or id(t) in self.params or id(t) in self.buffers

    def node(self, t: torch.Tensor) -> RecNode:
        """The node of ``t``; parameters get a placeholder on first use, other
        untracked tensors a constant input."""
        n = self.node_of.get(id(t))
        if n is not None:
            return n
        name = self.params.get(id(t)) or self.buffers.get(id(t))
        ph = self.graph.placeholder(f"p_{len(self.to_param) + len(self.to_buffer)}" if name else f"c_{self.consts}")
        if name is None:
            self.consts += 1
        elif id(t) in self.params:
            self.to_param[ph.name] = name
        else:
            self.to_buffer[ph.name] = name
        self.bind(t, ph)
        return ph

    def arg(self, a):
        """``a`` with every tensor replaced by its node."""
        if isinstance(a, torch.Tensor):
            return self.node(a)
        if isinstance(a, (tuple, list)):
            return type(a)(self.arg(x) for x in a) if isinstance(a, list) else tuple(self.arg(x) for x in a)
        return a

    # -- the mode ---------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _short_name(func)
        ins = _tensors((args, kwargs), [])
        if not any(self.tracked(t) for t in ins):
            return func(*args, **kwargs)
        if name in _VALUE_READS:
            if any(self.is_weighted(t) for t in ins):
                raise RecordError(f"the forward reads the value of a tensor computed from weights or "
                                  f"floating-point data ({name}): data-dependent control flow")
            self.input_reads.append(name)
            return func(*args, **kwargs)
        inplace = (name.endswith("_") and not name.startswith("_")) or "out" in kwargs
        target = kwargs.get("out", args[0] if args else None) if inplace else None
        if inplace and isinstance(target, torch.Tensor) and self.storages.get(_storage(target), 0) > 1:
            raise RecordError(f"in-place '{name}' on a tensor that shares storage with another traced tensor")
        out = func(*args, **kwargs)
        if name == "__iter__":  # iterating a tensor unbinds its first axis
            out = tuple(out)
            _call(self, "unbind", [args[0]], None, out)
            return iter(out)
        if name == "index_put_":
            out = args[0]
        if not inplace and any(out is t for t in ins):
            return out
        outs = _tensors(out, [])
        if outs:
            _emit(self, name.rstrip("_") if inplace else name, args, kwargs, out)
            if any(self.is_weighted(t) for t in ins):
                self.weighted.update(id(t) for t in outs)
        return out

    def is_weighted(self, t: torch.Tensor) -> bool:
        """``t`` is computed from a parameter, a buffer or floating-point data."""
        return id(t) in self.weighted or id(t) in self.params or id(t) in self.buffers or t.is_floating_point()



def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # tensors without storage (some subclasses)
        return id(t)


def _call(rec: _Recorder, name: str, args, kwargs=None, out=None) -> RecNode:
    kw = {k: rec.arg(v) for k, v in (kwargs or {}).items()}
    node = rec.graph.create_node("call_function", _target(name), rec.arg(tuple(args)), kw, name=name)
    if isinstance(out, torch.Tensor):
        rec.bind(out, node)
    elif out is not None:
        node.meta["val"] = [_Val(t) if isinstance(t, torch.Tensor) else t for t in out]
        for i, t in enumerate(out):
            if isinstance(t, torch.Tensor):
                rec.bind(t, rec.graph.create_node("call_function", operator.getitem, (node, i), name="getitem"))
    return node


def _emit(rec: _Recorder, name: str, args, kwargs, out) -> None:
    """Write one recorded call in the aten form the export translator reads."""
    norm = _NORMALISE.get(name)
    if norm is not None:
        norm(rec, name, args, kwargs, out)
    elif name in _IDENTITY:
        _call(rec, "clone", args[:1], None, out)
    else:
        tensors = _tensors((args, kwargs), [])
        _call(rec, name, tensors, None, out if isinstance(out, torch.Tensor) else tuple(_tensors(out, [])))


def _bind(names, args, kwargs, defaults=()):
    """Positional values of ``names`` from ``args``/``kwargs`` (missing: default or None)."""
    vals = list(args) + [None] * (len(names) - len(args))
    for i, n in enumerate(names):
        if n in kwargs:
            vals[i] = kwargs[n]
        elif i >= len(args) and i < len(defaults):
            vals[i] = defaults[i]
    return vals[:len(names)]


def _linear(rec, name, args, kwargs, out):
    _call(rec, "linear", _bind(("input", "weight", "bias"), args, kwargs), None, out)


def _conv(rec, name, args, kwargs, out):
    vals = _bind(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, kwargs,
                 (None, None, None, 1, 0, 1, 1))
    _call(rec, name, vals, None, out)


def _batch_norm(rec, name, args, kwargs, out):
    x, mean, var, w, b = _bind(("input", "running_mean", "running_var", "weight", "bias"), args, kwargs)
    _call(rec, "batch_norm", [x, w, b, mean, var], None, out)


def _layer_norm(rec, name, args, kwargs, out):
    _call(rec, "layer_norm", _bind(("input", "normalized_shape", "weight", "bias"), args, kwargs), None, out)


def _rms_norm(rec, name, args, kwargs, out):
    """``F.rms_norm(x, shape, weight)``: LayerNorm's structure without a bias (statistics lossy)."""
    x, shape, w = _bind(("input", "normalized_shape", "weight"), args, kwargs)
    _call(rec, "layer_norm", [x, shape, w, None], None, out)


def _embedding(rec, name, args, kwargs, out):
    ids, w = _bind(("input", "weight"), args, kwargs)
    _call(rec, "embedding", [w, ids], None, out)


def _sdpa(rec, name, args, kwargs, out):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    _call(rec, "scaled_dot_product_attention", _bind(names, args, kwargs,
                                                     (None, None, None, None, 0.0, False, None, False)), None, out)


def _mean(rec, name, args, kwargs, out):
    x, dim, keep = _bind(("input", "dim", "keepdim"), args, kwargs, (None, None, False))
    dims = list(range(x.dim())) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    _call(rec, "mean", [x, dims, bool(keep)], None, out)


def _dims(args, kwargs, key="dims"):
    rest = args[1:] if len(args) > 1 else kwargs.get(key, kwargs.get("size", kwargs.get("shape", ())))
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else list(rest)


def _permute(rec, name, args, kwargs, out):
    _call(rec, "permute", [args[0], _dims(args, kwargs)], None, out)


def _transpose(rec, name, args, kwargs, out):
    x = args[0]
    if name in ("t", "T") or (name == "mT"):
        a, b = (-2, -1) if name == "mT" or x.dim() > 2 else (0, 1)
    else:
        a, b = _bind(("input", "dim0", "dim1"), args, kwargs)[1:]
    _call(rec, "transpose", [x, a, b], None, out)


def _reshape(rec, name, args, kwargs, out):
    _call(rec, "view", [args[0]], None, out)


def _expand(rec, name, args, kwargs, out):
    _call(rec, "expand", [args[0], _dims(args, kwargs)], None, out)


def _cat(rec, name, args, kwargs, out):
    tensors, dim = _bind(("tensors", "dim"), args, kwargs, (None, 0))
    _call(rec, "cat", [list(tensors), dim], None, out)


def _split(rec, name, args, kwargs, out):
    key = "chunks" if name == "chunk" else "split_size_or_sections"
    x, size, dim = _bind(("input", key, "dim"), args, kwargs, (None, None, 0))
    if size is None:
        size = kwargs.get("split_size", kwargs.get("sections"))
    _call(rec, name, [x, size, dim], None, tuple(out))


def _softmax(rec, name, args, kwargs, out):
    x, dim = _bind(("input", "dim"), args, kwargs)
    _call(rec, "softmax", [x, dim if dim is not None else -1], None, out)


def _matmul(rec, name, args, kwargs, out):
    a, b = args[:2]
    _call(rec, "matmul", [b, a] if name == "rmatmul" else [a, b], None, out)


def _addmm(rec, name, args, kwargs, out):
    _call(rec, "addmm", _bind(("input", "mat1", "mat2"), args, kwargs), None, out)


def _elementwise(rec, name, args, kwargs, out):
    aten = {"rsub": "sub", "rdiv": "div", "rpow": "pow"}.get(name, name)
    vals = list(args[:2])
    if name in ("rsub", "rdiv", "rpow"):
        vals = vals[::-1]
    _call(rec, aten, vals, None, out)


def _getitem(rec, name, args, kwargs, out):
    """Basic indexing as a chain of ``unsqueeze`` / ``select`` / ``slice``; any
    tensor or list index is one ``index`` op (a barrier)."""
    x, idx = args[:2]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx) \
            or any(isinstance(i, bool) for i in idx):
        _call(rec, "index", [x] + _tensors(idx, []), None, out)
        return
    n_axes = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (x.dim() - n_axes) + idx[e + 1:]
    cur, axis, node = x, 0, rec.node(x)
    for i in idx:
        if isinstance(i, slice) and i.start in (None, 0) and i.stop is None and i.step in (None, 1):
            axis += 1
            continue
        nxt = cur[(slice(None),) * axis + (i,)]
        if i is None:
            step = ("view", [cur])
        elif isinstance(i, int):
            step = ("select", [cur, axis, i])
        else:
            step = ("slice", [cur, axis, i.start, i.stop, 1 if i.step is None else i.step])
        node = _call(rec, step[0], step[1], None, nxt)
        cur, axis = nxt, axis + (0 if isinstance(i, int) else 1)
    rec.bind(out, node)


_NORMALISE = {
    "linear": _linear, "conv1d": _conv, "conv2d": _conv, "conv3d": _conv, "batch_norm": _batch_norm,
    "layer_norm": _layer_norm, "rms_norm": _rms_norm, "embedding": _embedding, "scaled_dot_product_attention": _sdpa,
    "mean": _mean, "permute": _permute, "transpose": _transpose, "swapaxes": _transpose, "t": _transpose,
    "T": _transpose, "mT": _transpose, "view": _reshape, "reshape": _reshape, "flatten": _reshape,
    "unsqueeze": _reshape, "squeeze": _reshape, "view_as": _reshape, "reshape_as": _reshape,
    "expand": _expand, "expand_as": _expand, "cat": _cat, "concat": _cat, "concatenate": _cat,
    "split": _split, "chunk": _split, "softmax": _softmax, "matmul": _matmul, "rmatmul": _matmul,
    "bmm": _matmul, "addmm": _addmm, "getitem": _getitem,
    **{n: _elementwise for n in ("add", "sub", "rsub", "mul", "div", "rdiv", "pow", "rpow")},
}


class _Signature:
    def __init__(self, rec: _Recorder):
        self.inputs_to_parameters = rec.to_param
        self.inputs_to_buffers = rec.to_buffer


class Recorded:
    """What the export translator reads: ``graph`` and ``graph_signature``."""

    def __init__(self, rec: _Recorder):
        self.graph = rec.graph
        self.graph_signature = _Signature(rec)
        self.input_reads = list(rec.input_reads)


def record(model: torch.nn.Module, args: tuple, kwargs: dict) -> Recorded:
    """Run ``model(*args, **kwargs)`` once under the recorder."""
    rec = _Recorder(model)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            rec.input(f"arg{i}", a)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            rec.input(k, v)
    with torch.no_grad(), rec:
        out = model(*args, **kwargs)
    results = [rec.node_of[id(t)] for t in _outputs(out) if id(t) in rec.node_of]
    if not results:
        raise RecordError("no output of the forward pass depends on its inputs or parameters")
    rec.graph.output(tuple(results))
    return Recorded(rec)


def _outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    return _tensors(out, [])
