"""`mx-sidecar status`: the fleet as Redis sees it, read through the key layout of sidecar/redis_keys.py.

Per model: its fingerprints, the live sources (node, ranks, mode, readers, age, last heartbeat, authenticated),
the seeding leases and the targets in flight (readers counted on each source). Read-only: it never writes Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sidecar.config import Config
from sidecar.contract.auth import AuthError, Keyring
from sidecar.contract.codec import ProtocolError, decode
from sidecar.contract.messages import Sealed, SourceRecord
from sidecar.coordinator import open_record
from sidecar.explain import identity_differences
from sidecar.redis_keys import RedisKeys


def _open(keys: Keyring, key: str, blob: bytes, max_bytes: int) -> tuple[SourceRecord, str]:
    """The record and whether it is authenticated: 'yes' (verified with the key), 'NO KEY' (nothing to verify
    with), or 'REFUSED (reason)': shown, but a target would refuse it."""
    try:
        rec = open_record(keys, key, blob, max_bytes)
        return rec, "yes" if keys.enabled else "NO KEY"
    except AuthError as e:
        return decode(SourceRecord, decode(Sealed, blob, max_bytes).body, max_bytes), f"REFUSED ({e.reason})"


@dataclass(frozen=True)
class Source:
    model: str
    fingerprint: str
    replica: str
    node: str
    ranks: int
    mode: str
    readers: int
    age_s: float | None  # since the first publication; None for records without a timestamp
    heartbeat_s: float | None  # since the last heartbeat; None when the heartbeat key is gone
    live: bool  # heartbeat within the TTL the source beats with
    authenticated: str
    identity: dict[str, str] = field(default_factory=dict)  # what its fingerprint was computed from


@dataclass(frozen=True)
class Lease:
    fingerprint: str
    model: str  # "" when no source of that fingerprint tells which model it is
    holder: str
    expires_in_s: float


@dataclass
class ModelView:
    model: str
    fingerprints: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    leases: list[Lease] = field(default_factory=list)
    targets_in_flight: int = 0
    # with --explain: for each fingerprint after the first, the fields in which it differs from the first
    differences: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Fleet:
    redis: str
    taken_at: float
    models: list[ModelView]
    unreadable: list[str]  # keys whose value could not be decoded (with the reason)


def _beat(value: bytes | None) -> tuple[float, float] | None:
    """A heartbeat is 'wall-time ttl' (coordinator.Coordinator._beat)."""
    try:
        ts, ttl = (float(x) for x in (value or b"").split())
    except ValueError:
        return None
    return ts, ttl


async def read_fleet(r: Any, prefix: str, model: str | None = None, max_record_bytes: int = 64 << 20,
                     redis_label: str = "", keys: Keyring | None = None, explain: bool = False) -> Fleet:
    """One consistent-enough pass over Redis (SCAN + pipelined GETs); `model` filters the result."""
    now = time.time()
    unreadable: list[str] = []
    keys_of = RedisKeys(prefix)
    readers_by_fp = await _reader_counts(r, keys_of, unreadable)
    sources = await _sources(r, keys_of, keys or Keyring(None), max_record_bytes, now, unreadable)
    fp_model = {s.fingerprint: s.model for s in sources}
    leases = await _leases(r, keys_of, fp_model)
    models = _by_model(sources, leases, readers_by_fp, fp_model)
    if model is not None:
        models = [m for m in models if m.model == model]
    if explain:
        for m in models:
            m.differences = fingerprint_differences(m)
    return Fleet(redis_label, now, models, unreadable)


def fingerprint_differences(view: ModelView) -> dict[str, list[str]]:
    """Each fingerprint of the model after the first one that has a source -> its fields that differ."""
    described: dict[str, dict[str, str]] = {}
    for s in view.sources:
        described.setdefault(s.fingerprint, s.identity)
    fps = list(described)
    return {fp: identity_differences(described[fps[0]], described[fp]) for fp in fps[1:]}


async def _reader_counts(r: Any, keys_of: RedisKeys, unreadable: list[str]) -> dict[str, int]:
    readers_by_fp: dict[str, int] = {}
    async for key in r.scan_iter(match=keys_of.every_readers(), count=500):
        k = key.decode()
        if (parsed := keys_of.per_replica(k, "readers")) is None:
            continue
        fp = parsed.fingerprint
        v = await r.get(k)
        try:
            readers_by_fp[fp] = readers_by_fp.get(fp, 0) + max(0, int(v or 0))
        except ValueError:
            unreadable.append(f"{k}: not a count")
    return readers_by_fp


async def _sources(r: Any, keys_of: RedisKeys, keys: Keyring, max_record_bytes: int, now: float,
                   unreadable: list[str]) -> list[Source]:
    sources: list[Source] = []
    async for key in r.scan_iter(match=keys_of.every_record(), count=500):
        k = key.decode()
        if (src := keys_of.per_replica(k, "src")) is None:
            continue
        fp, rid = src.fingerprint, src.replica
        pipe = r.pipeline(transaction=False)
        pipe.get(k)
        pipe.get(keys_of.heartbeat(fp, rid))
        pipe.get(keys_of.readers(fp, rid))
        blob, hb, readers = await pipe.execute()
        if blob is None:
            continue  # expired between SCAN and GET
        try:
            rec, auth = _open(keys, k, bytes(blob), max_record_bytes)
        except ProtocolError as e:
            unreadable.append(f"{k}: {e}")
            continue
        beat = _beat(hb)
        sources.append(Source(
            model=rec.model, fingerprint=fp, replica=rid, node=rec.node, ranks=len(rec.ranks),
            mode=",".join(sorted({x.mode for x in rec.ranks})) or "-", readers=int(readers or 0),
            # max(0, ...): a beat written after this pass began is 0 s old, not negative
            age_s=max(0.0, now - rec.published_at) if rec.published_at else None,
            heartbeat_s=max(0.0, now - beat[0]) if beat else None, live=bool(beat and now - beat[0] <= beat[1]),
            authenticated=auth, identity=dict(rec.identity)))
    return sources


async def _leases(r: Any, keys_of: RedisKeys, fp_model: dict[str, str]) -> list[Lease]:
    leases: list[Lease] = []
    async for key in r.scan_iter(match=keys_of.every_seed(), count=500):
        k = key.decode()
        if (seed_fp := keys_of.seed_fingerprint(k)) is None:
            continue
        pipe = r.pipeline(transaction=False)
        pipe.get(k)
        pipe.pttl(k)
        holder, pttl = await pipe.execute()
        if holder is not None:
            leases.append(Lease(seed_fp, fp_model.get(seed_fp, ""), holder.decode(errors="replace"),
                                max(0, pttl) / 1000))
    return leases


def _by_model(sources: list[Source], leases: list[Lease], readers_by_fp: dict[str, int],
              fp_model: dict[str, str]) -> list[ModelView]:
    views: dict[str, ModelView] = {}

    def view(name: str) -> ModelView:
        return views.setdefault(name, ModelView(name))

    for s in sources:
        v = view(s.model)
        v.sources.append(s)
        if s.fingerprint not in v.fingerprints:
            v.fingerprints.append(s.fingerprint)
    for lease in leases:
        v = view(lease.model or "(seeding)")
        v.leases.append(lease)
        if lease.fingerprint not in v.fingerprints:
            v.fingerprints.append(lease.fingerprint)
    for fp, n in readers_by_fp.items():
        view(fp_model.get(fp, "(unknown)")).targets_in_flight += n
    models = sorted(views.values(), key=lambda m: m.model)
    for m in models:
        m.sources.sort(key=lambda s: (s.fingerprint, s.node, s.replica))
    return models


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render(fleet: Fleet) -> str:
    out = [f"{fleet.redis}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(fleet.taken_at))}"]
    if not fleet.models:
        out.append("no live sources, no seeding, no targets in flight")
    for m in fleet.models:
        live = sum(s.live for s in m.sources)
        out.append("")
        out.append(f"{m.model}: {live} live source{'s' * (live != 1)}, {len(m.leases)} seeding, "
                   f"{m.targets_in_flight} target{'s' * (m.targets_in_flight != 1)} in flight; "
                   f"fingerprint{'s' * (len(m.fingerprints) != 1)} {', '.join(f[:12] for f in m.fingerprints)}")
        if m.sources:
            rows = [["  REPLICA", "NODE", "FINGERPRINT", "RANKS", "MODE", "READERS", "AGE", "HEARTBEAT", "STATE",
                     "AUTH"]]
            rows += [[f"  {s.replica}", s.node, s.fingerprint[:12], str(s.ranks), s.mode, str(s.readers),
                      _ago(s.age_s), _ago(s.heartbeat_s) + (" ago" if s.heartbeat_s is not None else ""),
                      "live" if s.live else "stale", s.authenticated] for s in m.sources]
            out += _table(rows)
        for lease in m.leases:
            out.append(f"  seeding {lease.fingerprint[:12]}: lease held by {lease.holder}, "
                       f"expires in {lease.expires_in_s:.1f}s unless renewed")
        for fp, diffs in m.differences.items():
            out.append(f"  {fp[:12]} differs from {m.fingerprints[0][:12]} in {len(diffs)} field"
                       f"{'s' * (len(diffs) != 1)}:")
            out += [f"    {d}" for d in diffs] or ["    (no described field: a record without a description)"]
    for u in fleet.unreadable:
        out.append(f"unreadable: {u}")
    return "\n".join(out)




async def status(cfg: Config, model: str | None, as_json: bool, watch: float | None, explain: bool = False) -> int:
    """Print the fleet once, or every `watch` seconds until interrupted (--json --watch: one JSON per line)."""
    from sidecar.redis_client import connect, redact_url

    r = connect(cfg)
    keys = Keyring.from_file(cfg.auth_key_file)
    # Ctrl-C / SIGTERM end the watch between two passes: a KeyboardInterrupt delivered inside a Redis call was
    # seen to leave the process running (CI, under load: no exit 10 s after SIGINT).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            fleet = await read_fleet(r, cfg.redis_prefix, model, cfg.max_message_bytes, redact_url(cfg.redis_url),
                                     keys, explain)
            if as_json:
                print(json.dumps(asdict(fleet), indent=None if watch is not None else 2), flush=True)
            else:
                print(("\x1b[H\x1b[2J" if watch is not None else "") + render(fleet), flush=True)
            if watch is None:
                return 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), watch)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await r.aclose()
