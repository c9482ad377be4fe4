"""Normalisation table: torch modules, functions and methods -> IR op kinds.

Each entry is a small function ``(ctx, fx_node) -> None`` that calls
``ctx.emit(op, inputs, attrs)``.  Targets not listed here are emitted as an
op named after the call (``torch:einsum``), which has no coupling rule and
therefore acts as a barrier.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

ELEMENTWISE_MODULES = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.GELU: "gelu",
    nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
    nn.Mish: "mish", nn.Identity: "identity", nn.Dropout: "dropout",
    nn.Dropout1d: "dropout", nn.Dropout2d: "dropout", nn.Dropout3d: "dropout",
    nn.Hardtanh: "hardtanh", nn.Softplus: "softplus", nn.AlphaDropout: "dropout",
}
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample)
ELEMENTWISE_FUNCTIONS = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    operator.neg: "neg", torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div",
    torch.sigmoid: "sigmoid", torch.tanh: "tanh", torch.relu: "relu", F.relu: "relu",
    F.relu6: "relu6", F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid", F.dropout: "dropout", F.sigmoid: "sigmoid",
    torch.exp: "exp", torch.sqrt: "sqrt", torch.rsqrt: "rsqrt", torch.abs: "abs",
    torch.clamp: "clamp", F.leaky_relu: "leaky_relu", F.elu: "elu", F.mish: "mish",
    torch.erf: "erf", F.softplus: "softplus", F.hardtanh: "hardtanh", torch.addcmul: "addcmul",
}
ELEMENTWISE_METHODS = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "relu": "relu",
    "sigmoid": "sigmoid", "tanh": "tanh", "contiguous": "identity", "clone": "identity",
    "float": "identity", "to": "identity", "type_as": "identity", "exp": "exp",
    "sqrt": "sqrt", "rsqrt": "rsqrt", "abs": "abs", "clamp": "clamp", "neg": "neg",
    "add_": "add", "mul_": "mul", "relu_": "relu", "pow": "pow", "detach": "identity", "addcmul": "addcmul",
}
_RMS_NORM = getattr(nn, "RMSNorm", None)  # torch >= 2.4
POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_avg_pool1d, F.max_pool2d, F.avg_pool2d,
                  torch._C._nn.avg_pool2d, F.interpolate, F.adaptive_max_pool2d, F.max_pool1d,
                  F.avg_pool1d}


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is_literal(x) -> bool:
    return isinstance(x, int) and x != -1


def _sizes(node, start):
    sizes = node.args[start:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    if not sizes:
        sizes = node.kwargs.get("shape", node.kwargs.get("size", ()))
    return list(sizes)


# -- module handlers ---------------------------------------------------------

def module_handler(ctx, node, mod):
    path = node.target
    x = ctx.value(node.args[0]) if node.args else None
    if isinstance(mod, nn.modules.conv._ConvNd) and not isinstance(mod, nn.modules.conv._ConvTransposeNd):
        ctx.emit("conv", [x, ctx.param(path, "weight"), ctx.param(path, "bias")],
                 {"groups": mod.groups, "stride": mod.stride, "padding": mod.padding,
                  "dilation": mod.dilation})
    elif isinstance(mod, nn.Linear):
        ctx.emit("linear", [x, ctx.param(path, "weight"), ctx.param(path, "bias")])
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        ctx.emit("batch_norm", [x] + [ctx.param(path, n) for n in
                                      ("weight", "bias", "running_mean", "running_var")])
    elif isinstance(mod, nn.LayerNorm):
        ctx.emit("layer_norm", [x, ctx.param(path, "weight"), ctx.param(path, "bias")],
                 {"normalized_ndim": len(mod.normalized_shape)})
    elif _RMS_NORM is not None and isinstance(mod, _RMS_NORM):  # LayerNorm's structure without a bias
        ctx.emit("layer_norm", [x, ctx.param(path, "weight"), None], {"normalized_ndim": len(mod.normalized_shape)})
    elif type(mod) in ELEMENTWISE_MODULES:
        ctx.emit(ELEMENTWISE_MODULES[type(mod)], [x])
    elif isinstance(mod, POOL_MODULES):
        ctx.emit("pool", [x], {"axes": list(range(2, ctx.rank(node.args[0])))})
    elif isinstance(mod, nn.Flatten):
        ctx.emit("reshape", [x])
    elif isinstance(mod, nn.Softmax):
        ctx.emit("softmax", [x], {"dim": mod.dim})
    elif base_class(mod) is nn.MultiheadAttention:
        _mha(ctx, node, mod)
    elif _leaf_entry(mod) is not None:
        _leaf_entry(mod)[1](ctx, node, mod)
    else:
        ctx.emit(f"module:{type(mod).__name__}", [x] + [ctx.value(a) for a in node.args[1:]])


# -- attention modules traced as one op (leaves of the fx trace) --------------

def _tensor_args(ctx, node, skip: int = 1) -> list:
    """IR values of the tensor arguments after the first ``skip`` (masks...)."""
    args = list(node.args[skip:]) + list(node.kwargs.values())
    return [v for v in (ctx.value(a) for a in args if isinstance(a, torch.fx.Node)) if v is not None]


def _emit_heads(ctx, qkv_in, qkv, proj, heads, head_dim, table=None, extra=(), per_head_mask=False):
    """One ``mha`` op: inputs ``q, k, v, qkv_w, qkv_b, proj_w, proj_b, table, *extra``.

    ``qkv``/``proj`` are ``(module path, weight attr, bias attr)`` of the packed
    ``[3, heads, head_dim]`` rows and the ``[heads, head_dim]`` columns;
    ``per_head_mask``: a mask input has a head axis (heads cannot shrink).
    """
    params = [ctx.param(path, a) for path, w, b in (qkv, proj) for a in (w, b)]
    ctx.emit("mha", list(qkv_in) + params + [table, *extra],
             {"num_heads": int(heads), "head_dim": int(head_dim), "per_head_mask": bool(per_head_mask)})


def _mha(ctx, node, mod):
    path = node.target
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
        ctx.emit("module:MultiheadAttention(separate q/k/v, bias_k/bias_v or add_zero_attn)",
                 [ctx.value(a) for a in (q, k, v)])
        return
    extra = [ctx.value(a) for a in list(node.args[3:]) + list(node.kwargs.values())
             if isinstance(a, torch.fx.Node) and a not in (q, k, v)]
    mask = _meta_shape(_arg(node, 5, "attn_mask"))  # (L, S), or (N * heads, L, S): one mask per head
    _emit_heads(ctx, [ctx.value(a) for a in (q, k, v)], (path, "in_proj_weight", "in_proj_bias"),
                (f"{path}.out_proj", "weight", "bias"), mod.num_heads, mod.head_dim,
                extra=[e for e in extra if e is not None],
                per_head_mask=mask is not None and len(mask) == 3)


def _meta_shape(arg) -> tuple | None:
    """Shape of a tensor argument, ``None`` for anything else (a ``None`` input)."""
    meta = arg.meta.get("tensor_meta") if isinstance(arg, torch.fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _qkv_head_dim(mod) -> int:
    return mod.qkv.out_features // 3 // mod.num_heads


def _timm_attention(ctx, node, mod):
    """timm ``Attention``: ``qkv`` rows ``[3, heads, head_dim]``, ``proj``; the
    scale is a stored float and ``head_dim`` an attribute (heads are exact)."""
    x = ctx.value(node.args[0])
    mask = _meta_shape(_arg(node, 1, "attn_mask"))  # [B, 1 or heads, N, N]
    per_head = mask is not None and len(mask) == 4 and mod.num_heads > 1 and mask[1] == mod.num_heads
    _emit_heads(ctx, [x] * 3, (f"{node.target}.qkv", "weight", "bias"), (f"{node.target}.proj", "weight", "bias"),
                mod.num_heads, mod.head_dim, extra=_tensor_args(ctx, node), per_head_mask=per_head)


def _window_attention(ctx, node, mod):
    """Swin window attention (timm ``WindowAttention``, torchvision
    ``ShiftedWindowAttention``): packed ``qkv``, ``proj`` and a relative
    position bias table with one column per head."""
    x = ctx.value(node.args[0])
    table = ctx.param(node.target, "relative_position_bias_table")
    _emit_heads(ctx, [x] * 3, (f"{node.target}.qkv", "weight", "bias"), (f"{node.target}.proj", "weight", "bias"),
                mod.num_heads, _qkv_head_dim(mod), table, extra=_tensor_args(ctx, node))


def _timm_attention_ok(mod) -> bool:
    """Only the layout the ``mha`` rule knows: no norm across heads, no gate,
    and a forward that reshapes to ``attn_dim`` (older timm reshapes to the
    input width).  q/k norms act on ``head_dim`` inside each head and stay."""
    return isinstance(getattr(mod, "norm", None), nn.Identity) and getattr(mod, "gate", None) is None \
        and isinstance(getattr(mod, "attn_dim", None), int) \
        and mod.qkv.out_features == 3 * mod.num_heads * mod.head_dim


def _window_ok(mod) -> bool:
    """A per-head table and packed qkv; timm's module must be recent enough
    (``fused_attn``) to read ``head_dim`` as ``-1`` rather than ``C // heads``."""
    table = mod._parameters.get("relative_position_bias_table")  # fx hands out proxies of attributes
    recent = not base_class(mod).__module__.startswith("timm.") or hasattr(mod, "fused_attn")
    return (recent and isinstance(getattr(mod, "qkv", None), nn.Linear) and table is not None and table.dim() == 2
            and table.shape[1] == mod.num_heads and mod.qkv.out_features % (3 * mod.num_heads) == 0)


# Attention modules of optional packages, matched by exact class (module + name):
# (is the module in the supported configuration, handler).  Another subclass has
# its own forward, so it is traced through; graphprune's own subclasses (apply
# swaps in a forward that reads head_dim for pruned torchvision modules) count
# as their parent.
LEAF_MODULES = {
    "timm.layers.attention.Attention": (_timm_attention_ok, _timm_attention),
    "timm.models.swin_transformer.WindowAttention": (_window_ok, _window_attention),
    "torchvision.models.swin_transformer.ShiftedWindowAttention": (_window_ok, _window_attention),
}


def base_class(mod) -> type:
    """``mod``'s class, or the first parent of it when graphprune swapped in a
    subclass after pruning (:mod:`graphprune.apply.attention_modules`)."""
    return next((c for c in type(mod).__mro__ if not c.__module__.startswith("graphprune.")), type(mod))


def _leaf_entry(mod):
    cls = base_class(mod)
    entry = LEAF_MODULES.get(f"{cls.__module__}.{cls.__name__}")
    return entry if entry is not None and entry[0](mod) else None


def is_leaf_attention(mod) -> bool:
    """Attention modules captured as one ``mha`` op instead of being traced through."""
    return base_class(mod) is nn.MultiheadAttention or _leaf_entry(mod) is not None


# -- function / method handlers ---------------------------------------------

def _cat(ctx, node):
    tensors = _arg(node, 0, "tensors")
    ctx.emit("cat", [ctx.value(t) for t in tensors], {"axis": _arg(node, 1, "dim", 0)})


def _flatten(ctx, node):
    ctx.emit("reshape", [ctx.value(node.args[0])])


def _size_source(arg):
    """``(tensor_node, axis)`` if ``arg`` is ``t.size(k)``, ``t.size()[k]`` or ``t.shape[k]``."""
    if not hasattr(arg, "op"):
        return None
    if arg.op == "call_method" and arg.target == "size" and len(arg.args) == 2:
        return arg.args[0], arg.args[1]
    if arg.op == "call_function" and arg.target is operator.getitem and isinstance(arg.args[1], int):
        src = arg.args[0]
        if getattr(src, "op", None) == "call_method" and src.target == "size" and len(src.args) == 1:
            return src.args[0], arg.args[1]
        if getattr(src, "op", None) == "call_function" and src.target is getattr and src.args[1] == "shape":
            return src.args[0], arg.args[1]
    return None


def _view(ctx, node):
    """Reshape; records which output sizes are literals and which are read
    from another tensor's shape (``attrs['sources']``: input index, axis)."""
    sizes = _sizes(node, 1)
    x = node.args[0]
    inputs, sources = [ctx.value(x)], []
    for s in sizes:
        src = _size_source(s)
        if src is None or ctx.value(src[0]) is None:
            sources.append(None)
            continue
        inputs.append(ctx.value(src[0]))
        sources.append((len(inputs) - 1, src[1]))
    ctx.emit("reshape", inputs, {"static": [_is_literal(s) for s in sizes], "sources": sources})


def _permute(ctx, node):
    dims = _sizes(node, 1) if node.op == "call_method" else list(_arg(node, 1, "dims"))
    ctx.emit("permute", [ctx.value(node.args[0])], {"perm": dims})


def _transpose(ctx, node):
    r = ctx.rank(node.args[0])
    a, b = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
    perm = list(range(r))
    perm[a % r], perm[b % r] = perm[b % r], perm[a % r]
    ctx.emit("permute", [ctx.value(node.args[0])], {"perm": perm})


def _split(ctx, node):
    x = node.args[0]
    name = getattr(node.target, "__name__", node.target)
    dim = _arg(node, 2, "dim", 0)
    shapes = ctx.out_shapes(node)
    sizes = [s[dim] for s in shapes]
    # chunk(n) cuts the current width in n; split(k) cuts pieces of literal size k.
    equal = name == "chunk"
    ctx.emit("split", [ctx.value(x)], {"axis": dim, "sizes": sizes, "equal": equal})


def _is_square(arg) -> bool:
    """``arg`` is ``x.pow(2)`` / ``torch.pow(x, 2)`` / ``x ** 2``."""
    if not isinstance(arg, torch.fx.Node) or len(arg.args) < 2 or arg.args[1] != 2:
        return False
    return (arg.op == "call_method" and arg.target == "pow") or \
        (arg.op == "call_function" and arg.target in (torch.pow, operator.pow))


def _reduce(ctx, node):
    """``mean``/``sum`` over ``dim``; a ``mean(x**2, keepdim=True)`` is marked as
    RMSNorm's statistic (lossy across channels, not a barrier), as on the export path."""
    dims = _arg(node, 1, "dim")
    if dims is None:
        dims = list(range(ctx.rank(node.args[0])))
    elif isinstance(dims, int):
        dims = [dims]
    keep = bool(_arg(node, 2, "keepdim", False))
    name = getattr(node.target, "__name__", node.target)
    ctx.emit("reduce", [ctx.value(node.args[0])],
             {"axes": list(dims), "keepdim": keep, "statistic": keep and name == "mean" and _is_square(node.args[0])})


def _layer_norm(ctx, node):
    shape = _arg(node, 1, "normalized_shape")
    ctx.emit("layer_norm", [ctx.value(node.args[0]), ctx.value(_arg(node, 2, "weight")),
                            ctx.value(_arg(node, 3, "bias"))], {"normalized_ndim": len(shape)})


def _linear(ctx, node):
    ctx.emit("linear", [ctx.value(node.args[0]), ctx.value(_arg(node, 1, "weight")),
                        ctx.value(_arg(node, 2, "bias"))])


def _softmax(ctx, node):
    ctx.emit("softmax", [ctx.value(node.args[0])], {"dim": _arg(node, 1, "dim")})


def _getitem(ctx, node):
    src, idx = node.args
    if ctx.is_multi(src):
        ctx.alias(node, src, idx)
        return
    if not isinstance(idx, tuple):
        idx = (idx,)
    spec = []
    for i in idx:
        if i is None:
            spec.append("new")
        elif i is Ellipsis:
            spec.append("ellipsis")
        elif isinstance(i, slice):
            full = i.start in (None, 0) and i.stop is None and i.step in (None, 1)
            spec.append("full" if full else "slice")
        elif isinstance(i, int):
            spec.append("int")
        else:
            ctx.emit("index:tensor", [ctx.value(src)])
            return
    ctx.emit("index", [ctx.value(src)], {"index": spec})


def _expand(ctx, node):
    ctx.emit("expand", [ctx.value(node.args[0])])


def _roll(ctx, node):
    dims = _arg(node, 2, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims)
    ctx.emit("spatial", [ctx.value(node.args[0])], {"axes": dims})


def _pad(ctx, node):
    """``F.pad``: pair ``i`` of ``pad`` pads axis ``-1 - i``.  Axes padded by a
    literal ``(0, 0)`` pass through; the others (padded, or by amounts the
    trace only knows at run time) are spatial: their positions move."""
    r = ctx.rank(node.args[0])
    pad = list(_arg(node, 1, "pad"))
    axes = [r - 1 - i for i in range(len(pad) // 2) if not (pad[2 * i] == 0 and pad[2 * i + 1] == 0)]
    ctx.emit("spatial", [ctx.value(node.args[0])], {"axes": axes})


def _swin_attention(ctx, node):
    names = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size",
             "num_heads", "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias",
             "logit_scale")
    a = {n: _arg(node, i, n) for i, n in enumerate(names)}
    ctx.emit("swin_attention",
             [ctx.value(a["input"]), None, None, ctx.value(a["qkv_weight"]), ctx.value(a["qkv_bias"]),
              ctx.value(a["proj_weight"]), ctx.value(a["proj_bias"]), ctx.value(a["relative_position_bias"])],
             {"num_heads": a["num_heads"], "scale_depends_on_width": a["logit_scale"] is None})


def _swin_pad(ctx, node):
    """``_patch_merging_pad``: pad H, W to even, then cat the four 2x2 phases on C."""
    r = ctx.rank(node.args[0])
    ctx.emit("space_to_depth", [ctx.value(node.args[0])], {"axis": r - 1, "copies": 4, "spatial": [r - 3, r - 2]})


def _relative_bias(ctx, node):
    ctx.emit("relative_position_bias", [ctx.value(a) for a in node.args[:2]])


def _sdpa(ctx, node):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``."""
    mask, scale = _arg(node, 3, "attn_mask"), _arg(node, 6, "scale")
    ctx.emit("sdpa", [ctx.value(node.args[0]), ctx.value(_arg(node, 1, "key")), ctx.value(_arg(node, 2, "value")),
                      ctx.value(mask) if mask is not None else None],
             {"scale_given": scale is not None, "enable_gqa": bool(_arg(node, 7, "enable_gqa", False))})


def _elementwise(op):
    def handler(ctx, node):
        ctx.emit(op, [ctx.value(a) for a in list(node.args) + list(node.kwargs.values())])
    return handler


def _pool(ctx, node):
    ctx.emit("pool", [ctx.value(node.args[0])], {"axes": list(range(2, ctx.rank(node.args[0])))})


FUNCTIONS = {
    torch.cat: _cat, torch.concat: _cat, torch.flatten: _flatten, torch.reshape: _view,
    torch.permute: _permute, torch.transpose: _transpose, torch.swapaxes: _transpose,
    torch.chunk: _split, torch.split: _split, torch.mean: _reduce, torch.sum: _reduce,
    F.layer_norm: _layer_norm, F.linear: _linear, F.softmax: _softmax, torch.softmax: _softmax,
    operator.getitem: _getitem, torch.roll: _roll, F.pad: _pad, F.scaled_dot_product_attention: _sdpa,
}
METHODS = {
    "view": _view, "reshape": _view, "flatten": _flatten, "permute": _permute,
    "transpose": _transpose, "chunk": _split, "split": _split, "mean": _reduce, "sum": _reduce,
    "expand": _expand, "unsqueeze": _flatten, "squeeze": _flatten, "softmax": _softmax,
}
NAMED_FUNCTIONS = {
    "torchvision.ops.stochastic_depth.stochastic_depth": _elementwise("stochastic_depth"),
    "torchvision.models.swin_transformer.shifted_window_attention": _swin_attention,
    "torchvision.models.swin_transformer._patch_merging_pad": _swin_pad,
    "torchvision.models.swin_transformer._get_relative_position_bias": _relative_bias,
}


def function_handler(target):
    if target in FUNCTIONS:
        return FUNCTIONS[target]
    if target in ELEMENTWISE_FUNCTIONS:
        return _elementwise(ELEMENTWISE_FUNCTIONS[target])
    if target in POOL_FUNCTIONS:
        return _pool
    qual = f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}"
    return NAMED_FUNCTIONS.get(qual)


def method_handler(name):
    if name in METHODS:
        return METHODS[name]
    if name in ELEMENTWISE_METHODS:
        return _elementwise(ELEMENTWISE_METHODS[name])
    return None
