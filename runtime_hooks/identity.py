"""What any engine needs to name what it loaded, beside its own settings: the checkpoint's revision and short
digests of configuration text.

The revision (`checkpoint_revision`) is, first match wins:
  * MX_MODEL_REVISION (the operator's manifest digest or release name; nothing is hashed);
  * a local directory: `local-<digest>` over every non-hidden file's relative path, size and SHA-256 content digest
    (`local_checkpoint_digest`; per-file digests are cached by path, size, mtime and ctime, so a restart on an
    unchanged checkpoint reads no weight bytes); an explicit engine revision is appended as `@<revision>`;
  * a hub id: `hub-<commit>`, the revision (default "main") resolved to its commit from the Hugging Face cache,
    else from the hub unless HF_HUB_OFFLINE;
  * else `unresolved-<random>`, which matches no other replica.

An engine's adapter puts these into its `ModelIdentity` (runtime_hooks.exposure); two replicas whose identities
differ never copy weights from each other. Hence every doubt fails closed: a spurious mismatch costs one storage
load, a wrong match serves wrong weights.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime_hooks.atomic_file import replace_file

__all__ = [
    "CACHE_FILE",
    "CheckpointDigest",
    "checkpoint_revision",
    "config_text",
    "digest",
    "hub_commit",
    "json_digest",
    "local_checkpoint_digest",
]

log = logging.getLogger("mx.identity")

CACHE_FILE = ".mx-digests.json"  # beside the checkpoint's files; hidden, so never part of the digest itself
_LOCK_FILE = ".mx-digests.lock"
_CACHE_VERSION = 1
_BLOCK = 8 << 20
_WORKERS = max(1, min(4, os.cpu_count() or 1))  # a few readers saturate a disk; more only contend
# A file modified within this long before it was hashed may be modified again within the same timestamp tick
# (coarse on NFS and some filesystems), which its cache key would not show: such a digest is used, not cached
# (mtime only: a fresh copy's ctime is always recent, and a write moves both).
_RACY_NS = 2_000_000_000
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "org/name"


def checkpoint_revision(model: str, revision: str | None) -> str:
    """The revision in the identity of `model` as loaded with the engine's `revision` setting (module docstring)."""
    from sidecar.config import Config

    env = Config.from_env().model_revision
    if env:
        return env
    path = Path(model)
    if path.is_dir():
        try:
            ident = "local-" + local_checkpoint_digest(path).digest
        except OSError as e:
            log.warning("checkpoint %s: cannot read it whole (%s); this replica copies from no other", path, e)
            return _unresolved()
        # Engines load a local directory whatever the revision says; keeping it only ever separates more.
        return f"{ident}@{revision}" if revision else ident
    commit = hub_commit(model, revision)
    if commit is None:
        log.warning("model %s revision %s: no commit found (not in the Hugging Face cache, hub unreachable or "
                    "offline); this replica copies from no other (set MX_MODEL_REVISION to name the build)",
                    model, revision or "main")
        return _unresolved()
    return "hub-" + commit


def _unresolved() -> str:
    return "unresolved-" + secrets.token_hex(8)


# ---------------------------------------------------------------------------------------------- hub ids


def hub_commit(model: str, revision: str | None) -> str | None:
    """The commit `revision` (default "main") of hub repository `model` names: itself if a commit, else from the
    Hugging Face cache's refs, else (unless HF_HUB_OFFLINE) from the hub; None when unknown."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    if not _REPO_ID.fullmatch(model) or ".." in model:
        return None  # not a hub id (e.g. a local path that does not exist here)
    rev = revision or "main"
    commit = _cached_commit(model, rev)
    if commit is not None or _hf_offline():
        return commit
    try:
        from huggingface_hub import HfApi
    except ImportError:
        return None
    try:
        sha = HfApi().model_info(model, revision=rev, timeout=10).sha
    except Exception as e:
        log.warning("model %s revision %s: the hub did not answer: %s", model, rev, e)
        return None
    return sha if isinstance(sha, str) and _COMMIT.fullmatch(sha) else None


def _cached_commit(model: str, rev: str) -> str | None:
    # huggingface_hub's layout: <cache>/models--org--name/refs/<revision> holds the commit (refs/pr/1 included).
    if any(part in ("", ".", "..") for part in rev.split("/")):
        return None
    ref = _hf_hub_cache() / ("models--" + model.replace("/", "--")) / "refs" / rev
    try:
        text = ref.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _COMMIT.fullmatch(text) else None


def _hf_hub_cache() -> Path:
    try:
        from huggingface_hub import constants
    except ImportError:  # the same defaults huggingface_hub applies
        env = os.environ.get("HF_HUB_CACHE")
        if env:
            return Path(env).expanduser()
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        return Path(home).expanduser() / "hub"
    # Read at call time: huggingface_hub reads its environment once, at import.
    return Path(constants.HF_HUB_CACHE)


def _hf_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return True  # no client, no hub
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


# ---------------------------------------------------------------------------------------------- local directories


@dataclass(frozen=True)
class CheckpointDigest:
    """A local checkpoint's content digest and what computing it cost."""

    digest: str  # 16 hex
    files: int
    hashed_files: int
    hashed_bytes: int
    cached_files: int
    cached_bytes: int
    seconds: float
    cache_path: Path | None  # where the per-file digests were saved; None when nowhere


@dataclass(frozen=True)
class _File:
    rel: str  # relative path, "/"-separated
    path: str
    size: int
    mtime_ns: int
    ctime_ns: int

    def key(self) -> dict[str, Any]:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "ctime_ns": self.ctime_ns}


def local_checkpoint_digest(path: Path) -> CheckpointDigest:
    """Digest of every regular file under `path` (recursively, symlinks followed, names beginning with "." skipped):
    relative path, size and SHA-256 of the content, in sorted path order. Per-file digests come from the cache
    (`CACHE_FILE` in `path` when writable, else under $XDG_CACHE_HOME/mx-sidecar) where their key still matches."""
    t0 = time.monotonic()
    root = Path(path)
    cache_path = _cache_path(root)
    with _locked(cache_path):  # TP ranks of one replica start together: one hashes, the others read its cache
        files = sorted(_walk(root), key=lambda f: f.rel)
        cached = _load_cache(cache_path)
        digests: dict[str, str] = {}
        todo: list[_File] = []
        for f in files:
            entry = cached.get(f.rel)
            if isinstance(entry, dict) and _SHA256.fullmatch(str(entry.get("sha256", ""))) and all(
                    type(entry.get(k)) is int and entry[k] == v for k, v in f.key().items()):
                digests[f.rel] = entry["sha256"]
            else:
                todo.append(f)
        keep: dict[str, dict[str, Any]] = {f.rel: {**f.key(), "sha256": digests[f.rel]} for f in files
                                           if f.rel in digests}
        if todo:
            with ThreadPoolExecutor(_WORKERS, thread_name_prefix="mx-digest") as pool:
                for f, (sha, stable) in zip(todo, pool.map(_hash_file, todo), strict=True):
                    digests[f.rel] = sha
                    if stable:
                        keep[f.rel] = {**f.key(), "sha256": sha}
        saved = _save_cache(cache_path, keep) if keep != cached else cache_path
    h = hashlib.sha256(b"mx-checkpoint-v1\n")
    for f in files:
        h.update(json.dumps([f.rel, f.size, digests[f.rel]]).encode() + b"\n")
    hashed_bytes = sum(f.size for f in todo)
    total_bytes = sum(f.size for f in files)
    result = CheckpointDigest(
        digest=h.hexdigest()[:16], files=len(files), hashed_files=len(todo), hashed_bytes=hashed_bytes,
        cached_files=len(files) - len(todo), cached_bytes=total_bytes - hashed_bytes,
        seconds=time.monotonic() - t0, cache_path=saved)
    log.info("checkpoint %s: %d files; hashed %d (%d bytes), from cache %d (%d bytes); %.2fs (cache %s)",
             root, result.files, result.hashed_files, result.hashed_bytes, result.cached_files,
             result.cached_bytes, result.seconds, saved or "not saved")
    return result


def _walk(root: Path) -> Iterator[_File]:
    # followlinks: a symlinked directory's files are loaded like any other; `seen` stops a link cycle.
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)  # the target's: HF snapshots are symlinks into blobs/
            except FileNotFoundError:
                continue  # a dangling link: nothing an engine could load
            if stat.S_ISREG(st.st_mode):
                rel = Path(os.path.relpath(full, root)).as_posix()
                yield _File(rel, full, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash_file(f: _File) -> tuple[str, bool]:
    """SHA-256 of the file's content, and whether it may be cached under `f.key()`."""
    start_ns = time.time_ns()
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(f.path, "rb") as fh:
        before = os.fstat(fh.fileno())
        while n := fh.readinto(buf):
            h.update(view[:n])  # releases the GIL for large blocks: the pool's threads hash in parallel
        after = os.fstat(fh.fileno())
    key = (f.size, f.mtime_ns, f.ctime_ns)
    stable = all(key == (s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in (before, after))
    recent = f.mtime_ns > start_ns - _RACY_NS
    return h.hexdigest(), stable and not recent


def _cache_path(root: Path) -> Path:
    if _writable(root):
        return root / CACHE_FILE
    return _user_cache_path(root)


def _user_cache_path(root: Path) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = hashlib.sha256(os.path.realpath(root).encode()).hexdigest() + ".json"
    return Path(base) / "mx-sidecar" / "checkpoint-digests" / name


def _writable(d: Path) -> bool:
    return os.access(d, os.W_OK | os.X_OK)


@contextlib.contextmanager
def _locked(cache_path: Path) -> Iterator[None]:
    lock = cache_path.with_name(_LOCK_FILE if cache_path.name == CACHE_FILE else cache_path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        yield  # no lock: each process hashes for itself, which is slower, not wrong
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_cache(cache_path: Path) -> dict[str, Any]:
    """The cache's per-file entries; {} when absent, not ours, or malformed (entries are checked one by one)."""
    try:
        fd = os.open(cache_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "rb") as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError):
        log.info("checkpoint digest cache %s is unreadable or malformed; ignored", cache_path)
        return {}
    if not isinstance(data, dict) or data.get("v") != _CACHE_VERSION or not isinstance(data.get("files"), dict):
        log.info("checkpoint digest cache %s is of another version or malformed; ignored", cache_path)
        return {}
    return data["files"]


def _save_cache(cache_path: Path, files: dict[str, dict[str, Any]]) -> Path | None:
    # Atomic, and never through a link planted at the temp or the cache path (runtime_hooks.atomic_file).
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(cache_path, json.dumps({"v": _CACHE_VERSION, "files": files}, sort_keys=True).encode())
    except OSError as e:
        quiet = e.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOSPC)  # expected on read-only storage
        (log.info if quiet else log.warning)("checkpoint digest cache %s not saved: %s", cache_path, e)
        return None
    return cache_path


# ---------------------------------------------------------------------------------------------- configuration text


def config_text(cfg: object) -> str:
    """A Hugging Face config's full JSON (defaults included, so a changed default changes it), else its repr."""
    try:
        return str(cfg.to_json_string(use_diff=False))  # type: ignore[attr-defined]
    except Exception:
        return repr(cfg)


def json_digest(value: object) -> str:
    """`digest` of `value` as canonical JSON (sorted keys; what JSON cannot hold, as str)."""
    return digest(json.dumps(value, sort_keys=True, default=str))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
