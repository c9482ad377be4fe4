"""Exact composition of linear layers, in numpy only (no framework import).

A *layer* is an N-d convolution in PyTorch's layout: weight
``(out, in/groups, *kernel)``, optional bias ``(out,)``, per-dimension
stride, symmetric padding and dilation (:class:`ConvConfig`).  A Linear
layer is the 0-d case: weight ``(out, in)``, empty kernel/stride/padding
tuples, channels on the last axis.

Invariant of the module: every function returns a layer that computes what
its inputs compute, up to float rounding (all arithmetic is float64), or
raises :class:`FoldError` whose one-line message says why it cannot.  The
single way to fold something inexact is an explicit ``force=True``; the
caller then owns measuring the error (at the border, where moved zero
padding is not the padding of the intermediate map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import FoldError

__all__ = [
    "FoldError", "ConvConfig", "ConvLayer", "affine_refusal", "fold_affine", "fold_bn", "bn_affine",
    "compose_linear", "compose_linear_chain", "compose_refusal", "config_refusal", "composite_config", "compose",
    "residual_refusal", "add_identity", "layer_macs",
]

_MOVE = "padding of the intermediate map cannot move to the input: "


def _tuple(value, nd: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * nd
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class ConvConfig:
    """Hyper-parameters of an N-d convolution (``nd == 0``: a Linear layer).

    Invariants (checked): kernel, stride, padding and dilation have one entry
    per spatial dimension; ``groups`` divides both channel counts.
    """

    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"

    def __post_init__(self):
        nd = len(self.kernel)
        if any(len(t) != nd for t in (self.stride, self.padding, self.dilation)):
            raise FoldError(f"conv config needs one stride/padding/dilation per kernel dim, got {self}")
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise FoldError(f"groups={self.groups} does not divide channels {self.in_channels}->{self.out_channels}")

    @property
    def nd(self) -> int:
        return len(self.kernel)

    @property
    def padded(self) -> bool:
        return any(p > 0 for p in self.padding)

    def describe(self) -> str:
        if not self.nd:
            return f"linear {self.in_channels}->{self.out_channels}"
        k = "x".join(map(str, self.kernel))
        return f"{k} conv {self.in_channels}->{self.out_channels} (groups {self.groups})"


@dataclass(frozen=True, eq=False)
class ConvLayer:
    """Weights of one layer plus its :class:`ConvConfig`.

    Invariant (checked): ``weight.shape == (out, in/groups, *kernel)`` and the
    bias, if any, has shape ``(out,)``.
    """

    weight: np.ndarray
    bias: np.ndarray | None
    config: ConvConfig

    def __post_init__(self):
        c = self.config
        want = (c.out_channels, c.in_channels // c.groups, *c.kernel)
        if tuple(self.weight.shape) != want:
            raise FoldError(f"weight shape {tuple(self.weight.shape)} does not match {c.describe()} {want}")
        if self.bias is not None and tuple(self.bias.shape) != (c.out_channels,):
            raise FoldError(f"bias shape {tuple(self.bias.shape)} does not match {c.out_channels} outputs")

    @classmethod
    def conv(cls, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros") -> ConvLayer:
        """A conv layer from PyTorch-style arguments (ints broadcast to every dim)."""
        w = np.asarray(weight, dtype=np.float64)
        nd = w.ndim - 2
        cfg = ConvConfig(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), _tuple(stride, nd),
                         _tuple(padding, nd), _tuple(dilation, nd), groups, padding_mode)
        return cls(w, None if bias is None else np.asarray(bias, dtype=np.float64), cfg)

    @classmethod
    def linear(cls, weight, bias=None) -> ConvLayer:
        """A Linear layer ``y = x @ weight.T + bias`` (weight ``(out, in)``)."""
        w = np.asarray(weight, dtype=np.float64)
        return cls(w, None if bias is None else np.asarray(bias, dtype=np.float64), ConvConfig(w.shape[1], w.shape[0]))


# -- BatchNorm / affine ---------------------------------------------------------------------------

def _input_index(out_channels: int, in_channels: int, groups: int) -> np.ndarray:
    """``idx[o, j]`` = the input channel that weight entry ``[o, j]`` of a grouped layer reads."""
    o = np.arange(out_channels)[:, None]
    return (o // (out_channels // groups)) * (in_channels // groups) + np.arange(in_channels // groups)[None, :]


def affine_refusal(where: str, padding=(), padding_mode: str = "zeros", force: bool = False) -> str | None:
    """Why a per-channel affine cannot fold into a layer on side ``where``, or ``None``.

    Raises :class:`FoldError` for a ``where`` other than "after"/"before".
    """
    if where not in ("after", "before"):
        raise FoldError(f"where must be 'after' or 'before', got '{where}'")
    if where == "before" and any(p > 0 for p in padding) and padding_mode == "zeros" and not force:
        return (f"a norm before a zero-padded conv (padding {tuple(padding)}) cannot fold exactly: "
                "padding of the normalised map is not padding of the raw map")
    return None


def fold_affine(weight, bias, scale, shift, where: str = "after", groups: int = 1, padding=(),
                padding_mode: str = "zeros", force: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fold a per-channel affine map ``z -> scale*z + shift`` into a conv/linear layer.

    ``where="after"``: the affine reads the layer's output (channel = output
    channel); always exact.  ``where="before"``: the layer reads the affine's
    output (channel = input channel, through ``groups``); exact unless the
    layer zero-pads, because zero padding of an affine-mapped map is not the
    map of a zero-padded one (``force=True`` folds anyway).  Other padding
    modes (reflect, replicate, circular) commute with a per-channel affine.
    Returns float64 ``(weight, bias)``; the bias always exists.
    """
    reason = affine_refusal(where, padding, padding_mode, force)
    if reason:
        raise FoldError(reason)
    w = np.asarray(weight, dtype=np.float64)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    scale, shift = np.asarray(scale, dtype=np.float64), np.asarray(shift, dtype=np.float64)
    kernel_axes = (1,) * (w.ndim - 2)
    if where == "after":
        return w * scale.reshape(-1, *([1] * (w.ndim - 1))), b * scale + shift
    idx = _input_index(w.shape[0], w.shape[1] * groups, groups)
    s = scale[idx].reshape(*idx.shape, *kernel_axes)
    t = shift[idx].reshape(*idx.shape, *kernel_axes)
    return w * s, b + (w * t).reshape(w.shape[0], -1).sum(axis=1)


def fold_bn(weight, bias, mean, var, eps, gamma, beta, where: str = "after", groups: int = 1, padding=(),
            padding_mode: str = "zeros", force: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fold an inference-mode BatchNorm into the adjacent conv/linear layer.

    The norm computes ``gamma * (z - mean) / sqrt(var + eps) + beta``
    (``gamma``/``beta`` may be ``None``: no affine).  It is the affine map of
    :func:`fold_affine`, with the same exactness rules for ``where``.
    """
    scale, shift = bn_affine(mean, var, eps, gamma, beta)
    return fold_affine(weight, bias, scale, shift, where, groups, padding, padding_mode, force)


def bn_affine(mean, var, eps, gamma=None, beta=None) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` of an inference-mode BatchNorm as a per-channel affine map (float64)."""
    var = np.asarray(var, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    gamma = np.ones_like(var) if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = np.zeros_like(var) if beta is None else np.asarray(beta, dtype=np.float64)
    scale = gamma / np.sqrt(var + float(eps))
    return scale, beta - mean * scale


# -- Linear o Linear --------------------------------------------------------------------------------

def compose_linear(w1, b1, w2, b2) -> tuple[np.ndarray, np.ndarray | None]:
    """``y = W2 (W1 x + b1) + b2`` as one layer: ``(W2 W1, W2 b1 + b2)``.

    Any bias may be ``None``; the result has a bias unless both are ``None``.
    Always exact.
    """
    w1, w2 = np.asarray(w1, dtype=np.float64), np.asarray(w2, dtype=np.float64)
    if w2.shape[1] != w1.shape[0]:
        raise FoldError(f"cannot compose linear {w1.shape[1]}->{w1.shape[0]} with {w2.shape[1]}->{w2.shape[0]}")
    if b1 is None and b2 is None:
        return w2 @ w1, None
    b = np.zeros(w2.shape[0]) if b2 is None else np.asarray(b2, dtype=np.float64).copy()
    if b1 is not None:
        b = b + w2 @ np.asarray(b1, dtype=np.float64)
    return w2 @ w1, b


# -- Conv o Conv ------------------------------------------------------------------------------------

def compose_refusal(first: ConvLayer, second: ConvLayer, force: bool = False) -> str | None:
    """Why ``second(first(x))`` cannot be one layer, or ``None`` if it can (exactly).

    :func:`config_refusal` with the first layer's bias read from its values.
    """
    zero = first.bias is None or not np.any(first.bias)
    return config_refusal(first.config, second.config, zero, force)


def config_refusal(c1: ConvConfig, c2: ConvConfig, first_bias_zero: bool, force: bool = False) -> str | None:
    """Why a ``c2 o c1`` composite is not exact, or ``None``, from configs alone.

    With ``force=True`` only the reasons that no layer can get around are
    given (different dimensionality, channel mismatch); moved padding is then
    accepted.  Padding of ``c2`` is exact to move to the input only along
    dims where ``c1`` has a 1-wide kernel, zero-mode padding and a bias that
    is exactly zero (it maps a zero border to a zero border).
    """
    if c1.nd != c2.nd:
        return f"cannot compose a {c1.describe()} with a {c2.describe()}"
    if c1.out_channels != c2.in_channels:
        return f"channel mismatch: {c1.describe()} then {c2.describe()}"
    if force or not c2.padded:
        return None
    dims = [i for i, p in enumerate(c2.padding) if p > 0]
    if c2.padding_mode != "zeros":
        return _MOVE + f"the second layer pads with '{c2.padding_mode}'"
    if any(c1.kernel[i] != 1 for i in dims):
        return _MOVE + f"the first layer's kernel {c1.kernel} reads more than the border it pads {c2.padding}"
    if c1.padding_mode != "zeros" and c1.padded:
        return _MOVE + f"the first layer pads with '{c1.padding_mode}'"
    if not first_bias_zero:
        return _MOVE + "the first layer's bias makes its output border non-zero"
    return None


def _composite_groups(c1: ConvConfig, c2: ConvConfig) -> int:
    """Largest group count whose block structure covers every input the composite reads.

    Output ``q`` of the composite reads a contiguous range ``[lo, hi)`` of
    input channels (the inputs of every conv1 group feeding q's conv2 group).
    Structural, never from weight values.
    """
    cin, cmid, cout = c1.in_channels, c1.out_channels, c2.out_channels
    m1, m2, i1 = cmid // c1.groups, cmid // c2.groups, cin // c1.groups
    q = np.arange(cout)
    g2 = q // (cout // c2.groups)
    lo = (g2 * m2 // m1) * i1
    hi = ((g2 + 1) * m2 - 1) // m1 * i1 + i1
    n = math.gcd(cin, cout)
    for g in (d for d in range(n, 0, -1) if n % d == 0):
        blk = q // (cout // g)
        if np.all(lo >= blk * (cin // g)) and np.all(hi <= (blk + 1) * (cin // g)):
            return g
    return 1


def composite_config(c1: ConvConfig, c2: ConvConfig) -> ConvConfig:
    """Config of the one layer equal to ``c2 o c1`` (padding of c2 moved to the input).

    Per dim: stride ``s1*s2``; the first stride dilates the second kernel, so
    taps sit at offsets ``s1*d2*j + d1*k``, all multiples of
    ``D = gcd(d1, s1*d2)`` (a 1-wide kernel drops out): dilation ``D``, kernel ``(s1*d2*(k2-1) + d1*(k1-1))/D + 1``;
    padding ``p1 + s1*p2``.  Groups from :func:`_composite_groups`.
    """
    kernel, dilation, padding = [], [], []
    for k1, s1, d1, p1, k2, d2, p2 in zip(c1.kernel, c1.stride, c1.dilation, c1.padding,
                                          c2.kernel, c2.dilation, c2.padding):
        span = s1 * d2 * (k2 - 1) + d1 * (k1 - 1)
        dil = math.gcd(d1 if k1 > 1 else 0, s1 * d2 if k2 > 1 else 0) or 1
        kernel.append(span // dil + 1)
        dilation.append(dil)
        padding.append(p1 + s1 * p2)
    mode = c1.padding_mode if c1.padded else (c2.padding_mode if c2.padded else "zeros")
    stride = tuple(a * b for a, b in zip(c1.stride, c2.stride))
    return ConvConfig(c1.in_channels, c2.out_channels, tuple(kernel), stride, tuple(padding), tuple(dilation),
                      _composite_groups(c1, c2), mode)


def _dense_block(w: np.ndarray, groups: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Rows ``rows`` x input channels ``cols`` of grouped weight ``w`` as a dense block."""
    out_g, in_g = w.shape[0] // groups, w.shape[1]
    (r0, r1), (c0, c1) = rows, cols
    res = np.zeros((r1 - r0, c1 - c0, *w.shape[2:]))
    for g in range(r0 // out_g, (r1 - 1) // out_g + 1):
        qa, qb = max(r0, g * out_g), min(r1, (g + 1) * out_g)
        ca, cb = max(c0, g * in_g), min(c1, (g + 1) * in_g)
        if ca < cb:
            res[qa - r0:qb - r0, ca - c0:cb - c0] = w[qa:qb, ca - g * in_g:cb - g * in_g]
    return res


def _composite_weight(first: ConvLayer, second: ConvLayer, cfg: ConvConfig) -> np.ndarray:
    """Composite kernel in the grouped layout of ``cfg``, built one conv1 group at a time.

    For conv1 group ``g`` the rows that read it lie in one composite group
    (guaranteed by :func:`_composite_groups`), so each block lands at a fixed
    column offset; memory stays at the size of the result.
    """
    c1, c2 = first.config, second.config
    m1, i1 = c1.out_channels // c1.groups, c1.in_channels // c1.groups
    o2, mid2 = c2.out_channels // c2.groups, c2.in_channels // c2.groups
    og, ig = cfg.out_channels // cfg.groups, cfg.in_channels // cfg.groups
    span = [s1 * d2 * (k2 - 1) + d1 * (k1 - 1) + 1 for k1, s1, d1, k2, d2
            in zip(c1.kernel, c1.stride, c1.dilation, c2.kernel, c2.dilation)]
    out = np.zeros((cfg.out_channels, ig, *span))
    for g in range(c1.groups):
        rows = ((g * m1) // mid2 * o2, (((g + 1) * m1 - 1) // mid2 + 1) * o2)
        w2 = _dense_block(second.weight, c2.groups, rows, (g * m1, (g + 1) * m1))
        w1 = first.weight[g * m1:(g + 1) * m1]
        col = g * i1 - (rows[0] // og) * ig
        for j in np.ndindex(*c2.kernel):
            taps = tuple(slice(s1 * d2 * jj, s1 * d2 * jj + d1 * (k1 - 1) + 1, d1) for jj, k1, s1, d1, d2
                         in zip(j, c1.kernel, c1.stride, c1.dilation, c2.dilation))
            block = np.tensordot(w2[(slice(None), slice(None), *j)], w1, axes=1)
            out[(slice(rows[0], rows[1]), slice(col, col + i1), *taps)] += block
    return out[(slice(None), slice(None), *(slice(None, None, d) for d in cfg.dilation))]


def _composite_bias(first: ConvLayer, second: ConvLayer) -> np.ndarray | None:
    """``b2 + sum_{o,j} W2[q, o, j] b1[o]``: the first bias passes the second layer once."""
    if first.bias is None and second.bias is None:
        return None
    c2 = second.config
    b = np.zeros(c2.out_channels) if second.bias is None else second.bias.copy()
    if first.bias is not None:
        w2 = second.weight.reshape(*second.weight.shape[:2], -1).sum(axis=2)
        b = b + (w2 * first.bias[_input_index(c2.out_channels, c2.in_channels, c2.groups)]).sum(axis=1)
    return b


def compose(first: ConvLayer, second: ConvLayer, force: bool = False) -> ConvLayer:
    """One layer computing ``second(first(x))``; works for N-d convs and (0-d) Linear layers.

    Exact whenever :func:`compose_refusal` gives ``None`` (else
    :class:`FoldError`).  ``force=True`` moves the second layer's padding to
    the input even where that changes the output border.  Every composition
    with matching channels is one conv (the result may be dense where the
    inputs were grouped, e.g. depthwise then pointwise gives groups=1), so
    the caller decides on cost (:func:`layer_macs`).
    """
    reason = compose_refusal(first, second, force)
    if reason:
        raise FoldError(reason)
    cfg = composite_config(first.config, second.config)
    return ConvLayer(_composite_weight(first, second, cfg), _composite_bias(first, second), cfg)


def compose_linear_chain(layers) -> ConvLayer:
    """One Linear layer equal to applying ``layers`` (0-d, in order), in the cheapest association.

    Products of matrices associate, so the result does not depend on the
    order (up to rounding); the matrix-chain order only saves time, e.g.
    ``25088->4096->4096->1000`` costs a quarter when the last two go first.
    """
    layers = tuple(layers)
    if not layers or any(layer.config.nd for layer in layers):
        raise FoldError("compose_linear_chain takes one or more Linear (0-d) layers")
    dims = [layers[0].config.in_channels] + [layer.config.out_channels for layer in layers]
    cost, split = {(i, i): 0 for i in range(len(layers))}, {}
    for length in range(2, len(layers) + 1):
        for i in range(len(layers) - length + 1):
            j = i + length - 1
            cost[i, j], split[i, j] = min((cost[i, k] + cost[k + 1, j] + dims[i] * dims[k + 1] * dims[j + 1], k)
                                          for k in range(i, j))

    def build(i: int, j: int) -> ConvLayer:
        return layers[i] if i == j else compose(build(i, split[i, j]), build(split[i, j] + 1, j))

    return build(0, len(layers) - 1)


# -- residual ---------------------------------------------------------------------------------------

def residual_refusal(config: ConvConfig) -> str | None:
    """Why ``x + layer(x)`` is not one layer, or ``None``.

    Needs equal in/out channels, stride 1 and 'same' padding
    (``p = d*(k-1)/2`` per dim), so output position t reads input position t
    at the kernel centre.  Groups and any padding mode are fine.
    """
    if config.in_channels != config.out_channels:
        return f"residual needs equal channels, got {config.describe()}"
    if any(s != 1 for s in config.stride):
        return f"residual needs stride 1, got stride {config.stride}"
    for k, d, p in zip(config.kernel, config.dilation, config.padding):
        if d * (k - 1) % 2 or p != d * (k - 1) // 2:
            return f"residual needs 'same' padding, got kernel {config.kernel} padding {config.padding}"
    return None


def add_identity(layer: ConvLayer) -> ConvLayer:
    """The layer computing ``x + layer(x)``: weight ``W + I``, identity at the kernel centre."""
    reason = residual_refusal(layer.config)
    if reason:
        raise FoldError(reason)
    c = layer.config
    w = layer.weight.copy()
    q = np.arange(c.out_channels)
    centre = tuple(np.full(c.out_channels, k // 2) for k in c.kernel)
    w[(q, q % (c.in_channels // c.groups), *centre)] += 1.0
    return ConvLayer(w, None if layer.bias is None else layer.bias.copy(), c)


# -- cost ---------------------------------------------------------------------------------------------

def layer_macs(config: ConvConfig, out_shape) -> int:
    """Multiply-accumulates of the layer producing a tensor of ``out_shape``.

    Channels sit on axis ``-(nd+1)`` (the last axis for Linear); every other
    axis (batch, spatial, leading Linear dims) counts as output positions.
    Bias additions are not counted (as in torch's FlopCounterMode).
    """
    shape = tuple(int(s) for s in out_shape)
    axis = len(shape) - config.nd - 1
    if axis < 0 or shape[axis] != config.out_channels:
        raise FoldError(f"output shape {shape} does not carry the {config.out_channels} channels of "
                        f"{config.describe()}")
    positions = math.prod(shape) // config.out_channels
    return positions * config.out_channels * (config.in_channels // config.groups) * math.prod(config.kernel)
