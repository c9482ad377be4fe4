"""Channel labels: the data structure behind coupling.

Every position of every *channel-like* axis of a tensor carries an integer
label (a channel id).  Two positions whose labels end up in the same
union-find class must be kept or removed together; such a class is a
prunable *unit*.

A value's labelling is a :data:`LabelMap`: a dict from a sorted tuple of axes
to an integer array whose shape is the sizes of those axes.  A single axis
(``(1,)`` for NCHW channels) is the common case; a joint entry over several
axes arises when a reshape splits a channel axis (``[B, C] -> [B, g, C/g]``)
and records exactly which original channel sits at each joint position.
Axes in no entry are *free*: spatial, batch or token axes that carry no
channel identity.

Invariants:
* an array in a LabelMap has ``ndim == len(axes)`` and no axis of size 1
  unless the tensor's axis itself has size 1;
* label ids are never reused; the union-find only grows;
* ``fixed`` ids can never be removed; ``lossy`` ids sit behind a channel-mixing
  op (LayerNorm statistics) so their removal is exact only in the masked sense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import IRLintError

LabelMap = dict[tuple[int, ...], np.ndarray]


def unique_ids(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of ``a`` by one sort (numpy 2.4's hash-based
    ``np.unique`` is over 50x slower on the id arrays coupling makes)."""
    s = np.sort(np.asarray(a).ravel())
    if len(s) == 0:
        return s
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


class UnionFind:
    """Union-find over dense integer ids, vectorised with numpy.

    Invariant: ``parent[i] <= i`` for every id, so every class is rooted at
    its smallest id.  Unions hook the larger root under the smaller one for
    whole arrays of pairs at once; where several pairs hook the same root in
    one step only one write lands, and the loop repeats for the rest (each
    round removes at least one root, so it ends).
    """

    def __init__(self) -> None:
        self._parent = np.zeros(1024, dtype=np.int64)
        self.size = 0

    def fresh(self, n: int) -> np.ndarray:
        start = self.size
        if start + n > len(self._parent):
            grown = np.zeros(max(2 * len(self._parent), start + n), dtype=np.int64)
            grown[:start] = self._parent[:start]
            self._parent = grown
        ids = np.arange(start, start + n, dtype=np.int64)
        self._parent[start:start + n] = ids
        self.size = start + n
        return ids

    def _roots(self, ids: np.ndarray) -> np.ndarray:
        parent = self._parent
        r = parent[ids]
        while True:
            nxt = parent[r]
            if np.array_equal(nxt, r):
                break
            r = nxt
        parent[ids] = r  # path compression
        return r

    def find(self, x: int) -> int:
        return int(self._roots(np.asarray([x], dtype=np.int64))[0])

    def union(self, a: int, b: int) -> None:
        self.union_arrays(np.asarray([a]), np.asarray([b]))

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unify ``a`` and ``b`` elementwise (they broadcast together)."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        a, b = a.ravel(), b.ravel()
        while len(a):
            ra, rb = self._roots(a), self._roots(b)
            differ = ra != rb
            if not differ.any():
                return
            a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
            self._parent[np.maximum(ra, rb)] = np.minimum(ra, rb)

    def roots(self) -> np.ndarray:
        """Root of every id."""
        return self._roots(np.arange(self.size, dtype=np.int64)).copy()

    def canonical(self, arr: np.ndarray) -> np.ndarray:
        """Root of every id in ``arr`` (same shape)."""
        arr = np.asarray(arr, dtype=np.int64)
        return self._roots(arr.ravel()).reshape(arr.shape)


@dataclass
class Member:
    """One parameter axis whose positions carry labels.

    ``role`` is ``"out"`` when the parameter helps *produce* the channel
    (conv/linear rows, biases, norm affine, layer scales, additive embeddings)
    and ``"in"`` when it *reads* the channel (conv/linear input columns).
    """

    param: str
    axis: int
    role: str
    labels: np.ndarray
    is_buffer: bool = False
    node: str = ""
    op: str = ""      # op kind of the node that declared it ("batch_norm", "conv"...)
    slot: int = -1    # the parameter's input index on that node (1: a norm's scale)


@dataclass
class CouplingState:
    """What the op rules build while walking the graph once."""

    uf: UnionFind = field(default_factory=UnionFind)
    labels: dict[int, LabelMap] = field(default_factory=dict)
    members: dict[tuple[str, int], Member] = field(default_factory=dict)
    fixed: set[int] = field(default_factory=set)
    fixed_reasons: dict[int, str] = field(default_factory=dict)
    lossy: set[int] = field(default_factory=set)
    heads: set[int] = field(default_factory=set)
    hidden: set[int] = field(default_factory=set)
    produced: list[np.ndarray] = field(default_factory=list)
    barriers: list[str] = field(default_factory=list)
    node_index: dict[str, int] = field(default_factory=dict)

    def produce(self, n: int) -> np.ndarray:
        """Fresh ids for the ``n`` output channels of a producing layer.

        Only units that contain a produced id can be removed: a parameter
        axis that no layer produces (a buffer of coordinates, a token axis)
        is never a channel.
        """
        ids = self.uf.fresh(n)
        self.produced.append(ids)
        return ids

    # -- labels of values ---------------------------------------------
    def get(self, value) -> LabelMap:
        if value is None:
            return {}
        key = id(value)
        if key not in self.labels:
            self.labels[key] = self._param_labels(value) if value.param is not None else {}
        return self.labels[key]

    def set(self, value, lmap: LabelMap) -> None:
        """Set ``value``'s labels; each entry must match the sizes of its axes."""
        shape = value.shape or ()
        for axes, arr in lmap.items():
            if tuple(shape[a] for a in axes) != arr.shape:
                raise IRLintError(f"labels of shape {arr.shape} on axes {axes} do not fit {value.name} {shape}")
        self.labels[id(value)] = {k: v for k, v in lmap.items() if v.size > 0}

    def _param_labels(self, value) -> LabelMap:
        """A parameter read by a non-weight op gets fresh labels per axis.

        Each axis of size > 1 becomes its own single-axis entry and an
        ``out``-role member: the parameter helps produce those channels.
        """
        lmap: LabelMap = {}
        for axis, size in enumerate(value.shape or ()):
            if size > 1:
                ids = self.uf.fresh(size)
                lmap[(axis,)] = ids
                self.add_member(value.param.name, axis, "out", ids, value.param.is_buffer)
        return lmap

    # -- members, fixed, lossy ----------------------------------------
    def add_member(self, param: str, axis: int, role: str, labels: np.ndarray,
                   is_buffer: bool = False, node: str = "", op: str = "", slot: int = -1) -> None:
        """Record that ``param``'s ``axis`` carries ``labels`` (1-D).

        A parameter used twice (weight sharing) unifies its labels positionally.
        """
        labels = np.asarray(labels, dtype=np.int64).ravel()
        key = (param, axis)
        if key in self.members:
            self.uf.union_arrays(self.members[key].labels, labels)
            return
        self.members[key] = Member(param, axis, role, labels, is_buffer, node, op, slot)

    def fix(self, ids, reason: str) -> None:
        for x in np.asarray(ids).ravel():
            x = int(x)
            if x not in self.fixed:
                self.fixed.add(x)
                self.fixed_reasons.setdefault(x, reason)

    def fix_map(self, lmap: LabelMap, reason: str) -> None:
        for arr in lmap.values():
            self.fix(arr, reason)

    def mark_lossy(self, ids) -> None:
        self.lossy.update(int(x) for x in np.asarray(ids).ravel())

    def mark_hidden(self, ids) -> None:
        """These ids are the hidden (residual-stream) width: groups of kind ``"hidden"``."""
        self.hidden.update(int(x) for x in np.asarray(ids).ravel())

    def mark_heads(self, ids) -> None:
        """These ids are attention heads: their groups have kind ``"head"``."""
        self.heads.update(int(x) for x in np.asarray(ids).ravel())


# -- pure helpers on LabelMaps ----------------------------------------------

def shift_axes(lmap: LabelMap, offset: int) -> LabelMap:
    return {tuple(a + offset for a in axes): arr for axes, arr in lmap.items()}


def axis_entry(lmap: LabelMap, axis: int):
    """Return ``(axes, array)`` of the entry containing ``axis`` or ``None``."""
    for axes, arr in lmap.items():
        if axis in axes:
            return axes, arr
    return None


def materialise(lmap_axes: tuple[int, ...], arr: np.ndarray, shape) -> np.ndarray:
    """Broadcast one entry to the full ``shape`` (free axes get size 1 first)."""
    view_shape = [1] * len(shape)
    for a, n in zip(lmap_axes, arr.shape):
        view_shape[a] = n
    return np.broadcast_to(arr.reshape(view_shape), tuple(shape))


def compress(full: np.ndarray, uf: UnionFind) -> tuple[tuple[int, ...], np.ndarray]:
    """Drop axes along which ``full``'s classes are constant.

    Returns the remaining axes and the labels on them.
    """
    canon = uf.canonical(full)
    keep_axes = []
    for ax in range(full.ndim):
        if full.shape[ax] <= 1:
            continue
        first = np.take(canon, [0], axis=ax)
        if not np.all(canon == first):
            keep_axes.append(ax)
    index = tuple(slice(None) if ax in keep_axes else 0 for ax in range(full.ndim))
    return tuple(keep_axes), np.ascontiguousarray(full[index])
