"""One file replaced whole or not at all, never written through a planted link (the checkpoint digest cache, the
file loader's install markers)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["fsync_dir", "replace_file"]


def replace_file(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write `data` to a temp file beside `path`, then rename it over `path`: a reader sees the old or the new file.
    The temp file is created exclusively and without following links (a link planted at its name is never written
    through); the rename replaces a link at `path` itself instead of following it. `durable`: fsync the file before
    the rename and the directory after it. Raises OSError; the temp file is gone then."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
