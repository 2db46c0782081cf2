"""The compile cache's exchange between the engine and its sidecar: two small JSON files in the cache root.

The engine (a plugin that knows the engine's cache key) writes `request.json` while it loads its weights; the
sidecar looks for a live source of a cache with exactly that key, receives it (per-file SHA-256 in a sealed record,
runtime_hooks/files), installs it atomically and answers with `verdict.json`; the engine waits for the verdict
before it compiles, and compiles on its own when none comes in time (it then marks the request abandoned, and the
sidecar installs nothing for it). Both files live in `<root>/.mx-exchange/` (created 0700), written whole by rename.
A request of stage "ahead" comes first, before the engine builds its config, for the few files it reads then (vLLM:
modelinfos/); its key holds only the fields known then and matches any cache that agrees on them.

Engine-agnostic: a key is a mapping of named strings (vLLM: its version, the config hash it computes itself, torch,
Triton, the GPU architecture); the sidecar compares keys field by field and never interprets them. The key is also
the name of a file the source publishes with its cache (`mx-cache-key/<name>.json`), so a target reads a source's
key from the sealed record alone, before any transfer, and a mismatch names the fields that differ.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import msgspec

from runtime_hooks.atomic_file import replace_file

__all__ = ["EXCHANGE_DIR", "KEY_DIR", "CacheRequest", "CacheVerdict", "Exchange", "Stage", "VerdictResult",
           "cache_model", "check_units", "key_covers", "key_differences", "key_file_name", "parse_key_file_name",
           "unit_of", "wanted"]

VERSION = 1
EXCHANGE_DIR = ".mx-exchange"  # never published, never written by a receive (".mx-" paths are refused in records)
KEY_DIR = "mx-cache-key"
CACHE_SUFFIX = "@compile-cache"
MAX_KEY_FIELDS = 16
_FIELD = re.compile(r"[a-z][a-z0-9_]{0,31}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
VerdictResult = Literal["installed", "none", "mismatch", "refused", "failed", "present"]
Stage = Literal["compile", "ahead"]


class CacheRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    token: str
    model: str
    key: dict[str, str]
    units: list[str]  # what installs whole: directory patterns, one glob per component (see unit_of)
    at: float  # wall clock (both containers share the node's clock)
    # "compile": the engine's full key, before it compiles. "ahead": before the engine even builds its config (vLLM:
    # the model-class inspection it caches in modelinfos/); the key is a subset of a cache's key and only files
    # matching `only` install. The sidecar keeps what an "ahead" receive brought for the "compile" request after it.
    stage: Stage = "compile"
    only: list[str] = []  # file globs (fnmatch on the whole relative path); empty: everything


class CacheVerdict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    token: str
    result: VerdictResult
    detail: str
    installed: list[str]  # the cache directories (relative to the root) this verdict moved in
    files: list[str]  # every file it installed, relative to the root: what "hit" is checked against
    bytes: int
    seconds: float
    at: float


def cache_model(model: str) -> str:
    """The name a model's compile cache is published under (one name; the key tells caches apart)."""
    return model + CACHE_SUFFIX


def _check_key(key: Mapping[str, str]) -> None:
    if not key or len(key) > MAX_KEY_FIELDS:
        raise ValueError(f"a cache key has 1-{MAX_KEY_FIELDS} fields, not {len(key)}")
    for k, v in key.items():
        if not _FIELD.fullmatch(k) or not isinstance(v, str) or len(v) > 64:
            raise ValueError(f"cache key field {k!r}={v!r}: names are [a-z0-9_], values strings of <= 64 chars")


def _spelled(value: str) -> str:
    """A key value as a key file's name spells it."""
    return _UNSAFE.sub("_", value) or "_"


def key_file_name(key: Mapping[str, str]) -> str:
    """`mx-cache-key/arch=sm_90+config=1a2b...+torch=2.11.0+vllm=0.26.0.json`: fields sorted, unsafe characters
    replaced (the JSON inside holds the exact values)."""
    _check_key(key)
    name = "+".join(f"{k}={_spelled(key[k])}" for k in sorted(key))
    return f"{KEY_DIR}/{name}.json"


def parse_key_file_name(path: str) -> dict[str, str] | None:
    """The key a published key file's name spells, or None when `path` is not one."""
    if not path.startswith(KEY_DIR + "/") or not path.endswith(".json") or path.count("/") != 1:
        return None
    out: dict[str, str] = {}
    for part in path[len(KEY_DIR) + 1:-len(".json")].split("+"):
        k, eq, v = part.partition("=")
        if not eq or not _FIELD.fullmatch(k) or k in out:
            return None
        out[k] = v
    return out or None


def check_units(units: list[str], what: str = "unit") -> None:
    if len(units) > 8:
        raise ValueError(f"at most 8 {what} patterns")
    for u in units:
        parts = u.split("/")
        if not u or len(u) > 128 or u.startswith("/") or any(p in ("", ".", "..") for p in parts) \
                or parts[0].startswith(".mx-"):
            raise ValueError(f"{what} pattern {u[:80]!r} is not a relative path pattern")


def wanted(path: str, only: list[str]) -> bool:
    """Whether a request that installs `only` (file globs; empty: all) takes `path`."""
    return not only or any(fnmatch.fnmatchcase(path, o) for o in only)


def key_covers(theirs: Mapping[str, str], ours: Mapping[str, str]) -> bool:
    """A source's key (as its key file spells it) agrees with every field of `ours`: what an "ahead" request, which
    knows only some fields, matches on."""
    return all(theirs.get(k) == _spelled(v) for k, v in ours.items())


def unit_of(path: str, units: list[str]) -> str:
    """What `path` installs with: its longest leading directory that matches a pattern component by component
    (`torch_compile_cache/*` matches `torch_compile_cache/1a2b`, never deeper), else the file itself."""
    parts = path.split("/")
    best = path
    for u in units:
        pat = u.split("/")
        if len(pat) < len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pat, strict=False)):
            cand = "/".join(parts[:len(pat)])
            if best == path or cand.count("/") > best.count("/"):
                best = cand
    return best


def key_differences(ours: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """`field: ours X, source Y` for each field that differs (a field one side lacks counts)."""
    return [f"{k}: ours {ours.get(k, '(none)')}, source {theirs.get(k, '(none)')}"
            for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]


class Exchange:
    """The two files and the lock of one cache root, used from both sides."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.dir = self.root / EXCHANGE_DIR

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.dir, 0o700)
        if self.dir.is_symlink() or not self.dir.is_dir():
            raise OSError(f"{self.dir} is not a directory of ours")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialises the engine's 'abandoned' against the sidecar's install (flock; both sides on one node)."""
        self.ensure()
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ engine side
    def request(self, model: str, key: Mapping[str, str], units: list[str], stage: Stage = "compile",
                only: list[str] | None = None) -> CacheRequest:
        _check_key(key)
        check_units(units)
        check_units(only or [], "file")
        self.ensure()
        req = CacheRequest(VERSION, secrets.token_hex(8), model, dict(key), list(units), time.time(), stage,
                           list(only or []))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / "verdict.json")  # an earlier life's answer is not this request's
        replace_file(self.dir / "request.json", msgspec.json.encode(req))
        return req

    def wait_verdict(self, token: str, timeout: float, poll: float = 0.1) -> CacheVerdict | None:
        """This request's verdict, or None after `timeout`: the request is then abandoned under the lock (a verdict
        that landed meanwhile is returned instead), so nothing is installed once the engine compiles on its own."""
        v = self._poll_verdict(lambda v: v.token == token, timeout, poll)
        if v is not None:
            return v
        with self.locked():
            v = self.verdict()
            if v is not None and v.token == token:
                return v
            replace_file(self.dir / "abandoned", token.encode())
        return None

    def wait_any_verdict(self, since: float, timeout: float, poll: float = 0.1) -> CacheVerdict | None:
        """Ranks other than the requesting one: the first verdict given after `since` (wall clock)."""
        return self._poll_verdict(lambda v: v.at >= since, timeout, poll)

    def _poll_verdict(self, match: Callable[[CacheVerdict], bool], timeout: float,
                      poll: float) -> CacheVerdict | None:
        deadline = time.monotonic() + timeout
        while True:
            v = self.verdict()
            if v is not None and match(v):
                return v
            if time.monotonic() >= deadline:
                return None
            # A file written by another container has no event to wait on here; 0.1 s is nothing beside a compile.
            time.sleep(poll)

    # ------------------------------------------------------------------ sidecar side
    def pending_request(self) -> CacheRequest | None:
        """The engine's request, if one is there and not abandoned; malformed files count as none (and raise
        ValueError with the reason, for the log)."""
        raw = self._read("request.json")
        if raw is None:
            return None
        try:
            req = msgspec.json.decode(raw, type=CacheRequest)
        except msgspec.ValidationError as e:
            raise ValueError(f"{self.dir}/request.json: {e}") from None
        if req.v != VERSION:
            raise ValueError(f"{self.dir}/request.json: version {req.v}, this sidecar speaks {VERSION}")
        _check_key(req.key)
        check_units(req.units)
        check_units(req.only, "file")
        return None if self.abandoned(req.token) else req

    def abandoned(self, token: str) -> bool:
        return self._read("abandoned") == token.encode()

    def announce(self) -> None:
        """The sidecar answers requests here (an engine without this file does not wait for a verdict)."""
        self.ensure()
        replace_file(self.dir / "sidecar", str(os.getpid()).encode())

    def sidecar_announced(self) -> bool:
        return self._read("sidecar") is not None

    def answer(self, verdict: CacheVerdict) -> None:
        replace_file(self.dir / "verdict.json", msgspec.json.encode(verdict))

    def verdict(self) -> CacheVerdict | None:
        raw = self._read("verdict.json")
        if raw is None:
            return None
        try:
            return msgspec.json.decode(raw, type=CacheVerdict)
        except msgspec.ValidationError:
            return None

    def _read(self, name: str) -> bytes | None:
        try:
            fd = os.open(self.dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read(1 << 20)
