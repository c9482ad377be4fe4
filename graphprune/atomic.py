"""Atomic file writes: a file appears complete at its path, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path in ``path``'s folder (created if needed) to write to.

    When the block ends normally the temporary file replaces ``path``; when it
    raises, the temporary file is removed and ``path`` is left as it was.
    The temporary name keeps ``path``'s extension (writers that look at it).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
