"""Typed errors raised at the public API boundary.

Every error carries a one-line message that says what went wrong and where;
the CLI prints ``str(error)`` and nothing else.
"""

from __future__ import annotations


class GraphPruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class CaptureError(GraphPruneError):
    """The model could not be turned into the IR (names the failing call)."""


class UnsupportedOpError(GraphPruneError):
    """An op without a coupling rule was met under ``strict=True``."""


class InvalidArgumentError(GraphPruneError, ValueError):
    """An argument of a public call is out of range or names nothing."""


class PlanError(GraphPruneError):
    """A plan does not fit the model it is applied to."""


class VerificationError(GraphPruneError, AssertionError):
    """The pruned model does not compute what the plan says it should."""


class IRLintError(GraphPruneError):
    """An IR invariant does not hold (a bug in a frontend, not user input)."""


class FoldError(GraphPruneError, ValueError):
    """Two layers (or a layer and a norm) cannot be folded into one; the message says why."""
