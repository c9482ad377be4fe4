"""Frontends: turn a framework model into the IR."""
