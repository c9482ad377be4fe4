"""Coupling rules: one class per op kind, in one registry (:data:`RULES`).

``base`` holds the registry and helpers; ``layers`` the weight layers and
elementwise ops; ``shape`` the ops that move positions; ``attention`` the
fused attention ops.
"""

from . import attention, layers, shape  # noqa: F401  (registers the rules)
from .base import ELEMENTWISE, RULES, Rule, list_rules, register

__all__ = ["ELEMENTWISE", "RULES", "Rule", "list_rules", "register"]
