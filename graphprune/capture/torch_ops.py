"""Normalisation table: torch modules, functions and methods -> IR op kinds.

Each entry is a small function ``(ctx, fx_node) -> None`` that calls
``ctx.emit(op, inputs, attrs)``.  Targets not listed here are emitted as an
op named after the call (``torch:einsum``), which has no coupling rule and
therefore acts as a barrier.
"""

from __future__ import annotations

import operator

import torch
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
    torch.erf: "erf", F.softplus: "softplus", F.hardtanh: "hardtanh",
}
ELEMENTWISE_METHODS = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "relu": "relu",
    "sigmoid": "sigmoid", "tanh": "tanh", "contiguous": "identity", "clone": "identity",
    "float": "identity", "to": "identity", "type_as": "identity", "exp": "exp",
    "sqrt": "sqrt", "rsqrt": "rsqrt", "abs": "abs", "clamp": "clamp", "neg": "neg",
    "add_": "add", "mul_": "mul", "relu_": "relu", "pow": "pow", "detach": "identity",
}
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
    elif type(mod) in ELEMENTWISE_MODULES:
        ctx.emit(ELEMENTWISE_MODULES[type(mod)], [x])
    elif isinstance(mod, POOL_MODULES):
        ctx.emit("pool", [x], {"axes": list(range(2, ctx.rank(node.args[0])))})
    elif isinstance(mod, nn.Flatten):
        ctx.emit("reshape", [x])
    elif isinstance(mod, nn.Softmax):
        ctx.emit("softmax", [x], {"dim": mod.dim})
    elif isinstance(mod, nn.MultiheadAttention):
        _mha(ctx, node, mod)
    else:
        ctx.emit(f"module:{type(mod).__name__}", [x] + [ctx.value(a) for a in node.args[1:]])


def _mha(ctx, node, mod):
    path = node.target
    q, k, v = (ctx.value(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    if not mod._qkv_same_embed_dim or not mod.batch_first:
        ctx.emit("module:MultiheadAttention(separate q/k/v or seq-first)", [q, k, v])
        return
    ctx.emit("mha", [q, k, v, ctx.param(path, "in_proj_weight"), ctx.param(path, "in_proj_bias"),
                     ctx.param(path, "out_proj.weight"), ctx.param(path, "out_proj.bias")],
             {"num_heads": mod.num_heads})


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


def _reduce(ctx, node):
    dims = _arg(node, 1, "dim")
    if dims is None:
        dims = list(range(ctx.rank(node.args[0])))
    elif isinstance(dims, int):
        dims = [dims]
    ctx.emit("reduce", [ctx.value(node.args[0])],
             {"axes": list(dims), "keepdim": bool(_arg(node, 2, "keepdim", False))})


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
    operator.getitem: _getitem, torch.roll: _roll,
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
