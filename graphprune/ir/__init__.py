"""Framework-free IR: ``Graph``, ``Node``, ``Value``, ``Param``."""

from .graph import Graph, Node, Param, Value

__all__ = ["Graph", "Node", "Param", "Value"]
