"""The one atomic file write: readers see the old file or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync, ``os.replace``.

    Missing parent directories are created. The file gets the temp file's mode, 0600 (owner only:
    :func:`tempfile.mkstemp`'s), from the moment it exists. On any error (including an interrupt)
    the temp file is removed and an existing ``path`` is left as it was.

    Args:
        path: the file to write.
        data: the contents; a ``str`` is written as UTF-8.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
