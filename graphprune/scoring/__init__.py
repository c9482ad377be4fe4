"""Importance scoring (framework-free)."""

from . import reconstruction  # noqa: F401  (registers "reconstruction")
from .importance import IMPORTANCE, Importance, get_importance, list_importance, register_importance

__all__ = ["IMPORTANCE", "Importance", "get_importance", "list_importance", "register_importance"]
