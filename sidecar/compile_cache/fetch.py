"""Answer an engine's cache request: find a live cache of exactly its key, receive it through the file path
(per-file SHA-256 in the sealed record), install it into the cache root, never over what is already there.

Blocking (runs in a thread of the daemon). Slower, never wrong: any doubt ends in a verdict that installs nothing,
and the engine compiles as it would have without us.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from runtime_hooks.compile_cache import (
    EXCHANGE_DIR,
    KEY_DIR,
    VERSION,
    CacheRequest,
    CacheVerdict,
    Exchange,
    VerdictResult,
    cache_model,
    key_covers,
    key_differences,
    key_file_name,
    parse_key_file_name,
    unit_of,
    wanted,
)
from runtime_hooks.files.errors import FilesError, SourceNotFound
from runtime_hooks.files.layout import SourceLayout
from runtime_hooks.files.receiver import FileReceiver
from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.failpoints import Failpoints

log = logging.getLogger("mx.compile_cache")

ONE_LOOK_S = 0.01


def key_path_of(lay: SourceLayout) -> str:
    """The key file a cache publication carries ('' when it has none: not a cache of ours)."""
    return next((s.path for r in lay.ranks for s in r if parse_key_file_name(s.path) is not None), "")


def install_units(paths: list[str], patterns: list[str]) -> dict[str, list[str]]:
    """What moves in whole, by the engine's patterns (vLLM: `torch_compile_cache/<hash>`), each file by itself
    otherwise; the key file stays out."""
    units: dict[str, list[str]] = {}
    for p in paths:
        if p.split("/")[0] == KEY_DIR:
            continue
        units.setdefault(unit_of(p, patterns), []).append(p)
    return units


def make_verdict(req: CacheRequest, result: VerdictResult, detail: str, t0: float,
                 installed: list[str] | None = None, files: list[str] | None = None, nbytes: int = 0) -> CacheVerdict:
    """The answer to `req`, timed from `t0` (monotonic)."""
    return CacheVerdict(VERSION, req.token, result, detail, installed or [], files or [], nbytes,
                        round(time.monotonic() - t0, 3), time.time())


@dataclass
class Held:
    """What an "ahead" receive brought beyond what it installed: verified files kept in the exchange directory for
    the "compile" request that follows, so the cache crosses the network once."""

    dir: Path
    key_path: str  # the source's key file: what the "compile" request's key must equal
    paths: list[str]
    nbytes: int

    def drop(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _matches(req: CacheRequest, key_path: str) -> bool:
    if req.stage == "ahead":
        theirs = parse_key_file_name(key_path)
        return theirs is not None and key_covers(theirs, req.key)
    return key_path == key_file_name(req.key)


def fetch(cfg: Config, cache_cfg: Config, req: CacheRequest, ex: Exchange, failpoints: Failpoints,
          held: Held | None = None) -> tuple[CacheVerdict, Held | None]:
    """The verdict for `req`, and for an "ahead" request what it keeps for the next one. `held` (an earlier "ahead"
    request's) is used up here: installed from when its key is this request's, dropped otherwise."""
    t0 = time.monotonic()
    if not Keyring.from_file(cfg.auth_key_file).enabled:
        if held is not None:
            held.drop()
        return make_verdict(req, "refused", "no MX_AUTH_KEY_FILE: a compile cache is executable code and is installed "
                                            "only from a record sealed with the deployment key", t0), None
    if held is not None:
        try:
            if req.stage == "compile" and _matches(req, held.key_path):
                return _install_verdict(req, ex, held.dir, held.paths, held.nbytes, t0, failpoints,
                                        "received ahead"), None
        finally:
            held.drop()
    seen: dict[str, SourceLayout] = {}
    chosen: list[SourceLayout] = []

    def choose(layouts: list[SourceLayout]) -> SourceLayout | None:
        for lay in layouts:
            seen.setdefault(key_path_of(lay), lay)
        pick = next((lay for lay in layouts if _matches(req, key_path_of(lay))), None)
        if pick is not None:
            chosen.append(pick)
        return pick

    incoming = ex.dir / f"incoming-{req.token}"
    # One look: the engine waits for this verdict, and a cache that is not live yet is not worth its wait (the
    # engine compiles, then publishes its own).
    rx = FileReceiver(cache_model(req.model), incoming, cache_cfg, devices="cpu", source_timeout=ONE_LOOK_S,
                      choose=choose)
    keep: Held | None = None
    try:
        try:
            got = rx.receive()
        except SourceNotFound as e:
            if chosen:  # found, then gone before its bytes came (seen on 2 busy cores: a killed source's record
                # went stale between the look and the cache's sidecar asking Redis, and the verdict said "mismatch")
                return make_verdict(req, "failed", f"receive failed: {e}", t0), None
            others = sorted(k for k in seen if k)
            if not others:
                return make_verdict(req, "none", f"no live compile cache of {req.model}", t0), None
            theirs = parse_key_file_name(others[0]) or {}
            return make_verdict(req, "mismatch", f"{len(others)} live cache key(s), none equal to ours; the first "
                                                 f"differs in " + "; ".join(key_differences(req.key, theirs)), t0), None
        except (FilesError, OSError) as e:
            return make_verdict(req, "failed", f"receive failed: {e}", t0), None
        finally:
            rx.shutdown()
        lay = rx.layout
        assert lay is not None
        paths = [s.path for r in lay.ranks for s in r]
        verdict = _install_verdict(req, ex, incoming, paths, got.bytes, t0, failpoints, "received")
        if req.stage == "ahead" and verdict.result != "failed":
            rest = [p for p in paths if p not in set(verdict.files)]
            keep = Held(incoming, key_path_of(lay), rest, got.bytes)
        return verdict, keep
    finally:
        if keep is None:
            shutil.rmtree(incoming, ignore_errors=True)


def _install_verdict(req: CacheRequest, ex: Exchange, incoming: Path, paths: list[str], nbytes: int, t0: float,
                     failpoints: Failpoints, how: str) -> CacheVerdict:
    failpoints.hit("cache_before_install")  # tests: the engine stops waiting meanwhile
    units = {u: ps for u, ps in install_units(paths, req.units).items() if all(wanted(p, req.only) for p in ps)}
    with ex.locked():  # the engine's "abandoned" and this install never interleave
        if ex.abandoned(req.token):
            return make_verdict(req, "failed", "the engine stopped waiting and compiles on its own; nothing "
                                               "installed", t0)
        installed, files, present = _install(incoming, ex.root, units)
    if not units:
        return make_verdict(req, "none", f"the live cache holds no file matching {req.only}", t0)
    if not installed:
        return make_verdict(req, "present", f"every cache {'file' if req.only else 'directory'} asked for is already "
                                            f"in {ex.root} ({len(present)}); left as it is", t0)
    return make_verdict(req, "installed", f"{len(files)} files in {len(installed)} "
                        f"{'units' if req.only else 'directories'}, {how}"
                        + (f"; {len(present)} already present, left as they are" if present else ""), t0,
                        installed, files, nbytes)


def _install(incoming: Path, root: Path, units: dict[str, list[str]]) -> tuple[list[str], list[str], list[str]]:
    """Each unit renamed into `root` whole (one rename: atomic), only where nothing is: never over a cache that
    the engine or an earlier install wrote. Returns (installed units, their files, units left alone)."""
    real_root = root.resolve()
    installed: list[str] = []
    files: list[str] = []
    present: list[str] = []
    for unit, paths in sorted(units.items()):
        target = root / unit
        if unit.split("/")[0] == EXCHANGE_DIR:
            continue  # never: a record cannot name it (".mx-" paths are refused), kept as a second guard
        target.parent.mkdir(parents=True, exist_ok=True)
        parent = target.parent.resolve()
        if parent != real_root and real_root not in parent.parents:
            raise FilesError(f"{target} would land outside {root} (through a symlink); nothing more installed")
        if os.path.lexists(target):
            present.append(unit)
            continue
        os.rename(incoming / unit, target)
        installed.append(unit)
        files += paths
    return installed, files, present
