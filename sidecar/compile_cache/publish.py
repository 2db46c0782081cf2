"""Publish this replica's compile cache once it is complete: the engine serves and the root stopped changing.

The files go out through the file path (runtime_hooks/files/publisher.py) from this daemon's memory, read and hashed
once (a later write to the root does not change what is served), under `<model>@compile-cache` with the key file
`mx-cache-key/<key>.json`; the cache's own sidecar (child.py) announces them with a sealed record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from runtime_hooks.atomic_file import replace_file
from runtime_hooks.compile_cache import EXCHANGE_DIR, KEY_DIR, cache_model, key_file_name
from runtime_hooks.files.layout import check_relpath
from runtime_hooks.files.publisher import FilePublisher
from sidecar.config import Config

log = logging.getLogger("mx.compile_cache")

Snapshot = dict[str, tuple[int, int]]  # path -> (size, mtime_ns)


def cache_files(root: Path) -> list[str]:
    """Every regular file of the cache root, relative; ours (the exchange, key files) and hidden ones left out, and
    lock files (a lock is a process's, not the cache's). Symlinks are not followed: a cache holds files."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (rel_dir == "." and d in (EXCHANGE_DIR, KEY_DIR)))
        for f in sorted(filenames):
            p = Path(dirpath, f)
            if f.startswith(".") or f.endswith(".lock") or p.is_symlink() or not p.is_file():
                continue
            out.append(check_relpath(p.relative_to(root).as_posix()))
    return out


def snapshot(root: Path) -> Snapshot:
    snap: Snapshot = {}
    for rel in cache_files(root):
        try:
            st = os.stat(root / rel)
        except FileNotFoundError:
            continue
        snap[rel] = (st.st_size, st.st_mtime_ns)
    return snap


async def settle(root: Path, quiet_s: float, limit_s: float) -> Snapshot | None:
    """The root's files once nothing changed for `quiet_s`, or None after `limit_s` of changes. Polled: a shared
    volume of another container gives this process no change events it can rely on (inotify misses writes made
    through other mounts of an overlay); a stat walk per second is small beside a compile."""
    loop = asyncio.get_running_loop()
    t_end = loop.time() + limit_s
    last = await asyncio.to_thread(snapshot, root)
    quiet_since = loop.time()
    step = min(1.0, quiet_s / 4)
    while loop.time() < t_end:
        await asyncio.sleep(step)
        now = await asyncio.to_thread(snapshot, root)
        if now != last:
            last, quiet_since = now, loop.time()
        elif loop.time() - quiet_since >= quiet_s:
            return last  # possibly empty: the engine compiled nothing
    return None


class CachePublication:
    """The cache served from memory until `close()` (blocking calls: run them in a thread)."""

    def __init__(self, cache_cfg: Config, root: Path, model: str, key: Mapping[str, str]) -> None:
        self.cfg = cache_cfg
        self.root = root
        self.model = model
        self.key = dict(key)
        self.publisher: FilePublisher | None = None

    def open(self, files: list[str]) -> int:
        """Publishes `files` plus the key file; returns the bytes served."""
        key_rel = key_file_name(self.key)
        (self.root / KEY_DIR).mkdir(exist_ok=True)
        replace_file(self.root / key_rel, json.dumps(self.key, sort_keys=True).encode())
        pub = FilePublisher(self.root, cache_model(self.model), "model-dir", [[*files, key_rel]], ["cpu"], self.cfg)
        self.publisher = pub
        outcomes = pub.initialize(self.cfg.sidecar_timeout)
        if outcomes != ["loaded"] and outcomes != ["received"]:
            raise RuntimeError(f"the cache's sidecar gave the publication {outcomes}, not a source's verdict")
        return pub.total_bytes

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.shutdown()
            self.publisher = None
