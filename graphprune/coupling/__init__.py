"""Coupling: channel labels, op rules and groups (framework-free)."""

from .groups import Coupling, Group, GroupMember, couple
from .rules import RULES, list_rules, register

__all__ = ["Coupling", "Group", "GroupMember", "couple", "RULES", "list_rules", "register"]
