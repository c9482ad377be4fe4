"""A small, framework-free graph IR.

Invariants (checked by :meth:`Graph.lint`):

* every ``Value`` has at most one producer, and it is the node that lists it
  in ``outputs``;
* ``value.uses`` lists exactly the ``(node, input_index)`` pairs that read it;
* nodes are stored in topological order: a node's inputs are produced by an
  earlier node, are graph inputs, or are parameters;
* parameter values (``value.param`` set) have no producer.

Nothing in this package imports torch or onnx.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import IRLintError


@dataclass(eq=False)
class Param:
    """Where a parameter or buffer lives in the source framework.

    ``name`` is the qualified name as ``named_parameters()`` /
    ``named_buffers()`` spell it (PyTorch) or the initializer name (ONNX).
    """

    name: str
    shape: tuple[int, ...]
    is_buffer: bool = False


@dataclass(eq=False)
class Value:
    """A tensor flowing through the graph.  ``shape`` is ``None`` if unknown."""

    name: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    param: Param | None = None
    producer: Node | None = None
    uses: list[tuple[Node, int]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return len(self.shape) if self.shape is not None else -1

    def __repr__(self) -> str:
        return f"Value({self.name}, shape={self.shape})"


@dataclass(eq=False)
class Node:
    """One operation.  ``op`` is a normalised op kind (``"conv"``, ``"add"``...).

    ``inputs`` may hold ``None`` for absent optional inputs (e.g. no bias).
    ``source`` names the original call for messages (fx target, ONNX node).
    ``module`` is the owning module path where the frontend knows it.
    """

    name: str
    op: str
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    module: str | None = None

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.op})"

    def describe(self) -> str:
        """One-line description used in error messages."""
        where = f" in module '{self.module}'" if self.module else ""
        return f"node '{self.name}' (op '{self.op}', from {self.source}){where}"


class Graph:
    """Nodes in topological order, with use-def maintained by ``add_node``."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self._names: set[str] = set()

    # -- construction -------------------------------------------------
    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def add_input(self, name: str, shape=None, dtype=None) -> Value:
        v = Value(self._unique(name), tuple(shape) if shape is not None else None, dtype)
        self.inputs.append(v)
        return v

    def add_param(self, name: str, shape, is_buffer: bool = False, dtype=None) -> Value:
        """Return the value of parameter ``name``, creating it once."""
        if name in self.params:
            return self.params[name]
        shape = tuple(shape)
        v = Value(self._unique(name), shape, dtype, param=Param(name, shape, is_buffer))
        self.params[name] = v
        return v

    def add_node(self, op: str, inputs, output_shapes, *, name: str | None = None,
                 attrs=None, source: str = "", module: str | None = None,
                 dtypes=None) -> Node:
        """Append a node reading ``inputs`` and producing one value per shape."""
        node = Node(self._unique(name or op), op, list(inputs), [], dict(attrs or {}),
                    source, module)
        for i, shape in enumerate(output_shapes):
            dt = dtypes[i] if dtypes else None
            out = Value(self._unique(f"{node.name}:{i}"),
                        tuple(shape) if shape is not None else None, dt, producer=node)
            node.outputs.append(out)
        for idx, v in enumerate(node.inputs):
            if v is not None:
                v.uses.append((node, idx))
        self.nodes.append(node)
        return node

    def set_outputs(self, values) -> None:
        self.outputs = list(values)

    # -- queries ------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    # -- invariants ---------------------------------------------------
    def lint(self) -> None:
        """Raise :class:`IRLintError` if a documented invariant is broken."""
        seen: set[int] = {id(v) for v in self.inputs} | {id(v) for v in self.params.values()}
        for v in self.params.values():
            if v.producer is not None:
                raise IRLintError(f"parameter value {v.name} has a producer")
        for node in self.nodes:
            for idx, v in enumerate(node.inputs):
                if v is None:
                    continue
                if id(v) not in seen:
                    raise IRLintError(f"{node.describe()} reads {v.name} before it is produced")
                if (node, idx) not in [(n, i) for n, i in v.uses]:
                    raise IRLintError(f"{v.name} does not record its use by {node.name}")
            for out in node.outputs:
                if out.producer is not node:
                    raise IRLintError(f"{out.name} does not name {node.name} as producer")
                seen.add(id(out))
        for v in list(self.params.values()) + [o for n in self.nodes for o in n.outputs] + self.inputs:
            for user, idx in v.uses:
                if idx >= len(user.inputs) or user.inputs[idx] is not v:
                    raise IRLintError(f"{v.name} lists a use by {user.name} that does not read it")
        for v in self.outputs:
            if id(v) not in seen:
                raise IRLintError(f"graph output {v.name} is never produced")
