"""Redis: seeding lease, source registry, heartbeats, source choice.

The key layout is in sidecar/redis_keys.py; a replica id is host-pid-random, new per process.
Heartbeats never rewrite the large record (a field report had that fill a Redis disk).

Records and agent metadata are Sealed values (sidecar.contract.auth): an HMAC with the deployment key over the
kind, the key name and the body, checked before anything in them is used. Heartbeats, leases and reader
counts are not sealed: forging them can only make a target wait, try a dead source or pick a busier one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sidecar.choice import rank_sources
from sidecar.contract.auth import AuthError, Keyring
from sidecar.contract.codec import ProtocolError, decode, encode
from sidecar.contract.messages import Sealed, SourceRecord
from sidecar.errors import CoordinatorUnavailable
from sidecar.redis_client import describe_error
from sidecar.redis_keys import RedisKeys

log = logging.getLogger("mx.coordinator")

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# A bounded, random sample of a sources set, without members longer than a replica id: SMEMBERS would hand a
# flooded set (or 512 MB members) to this process whole.
_MEMBERS_LUA = """
local out = {}
for _, m in ipairs(redis.call('SRANDMEMBER', KEYS[1], tonumber(ARGV[1]))) do
  if #m <= tonumber(ARGV[2]) then out[#out + 1] = m end
end
return out
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _RecordHead(msgspec.Struct):
    """The first fields of a SourceRecord: enough to skip records of other models without decoding their ranks."""

    model: str = ""


_head_decoder = msgspec.msgpack.Decoder(_RecordHead)


# Members of a sources set looked at per choice: a set flooded by a Redis writer cannot stall a start-up.
MAX_SOURCE_MEMBERS = 256
MAX_REPLICA_ID_CHARS = 200
MAX_BEAT_BYTES = 128  # values are read with GETRANGE: never more than these bounds reach this process
MAX_COUNTER_BYTES = 32



@dataclass(frozen=True)
class Candidate:
    record: SourceRecord
    readers: int
    same_node: bool

    @property
    def replica(self) -> str:
        return self.record.replica

    @property
    def topology(self) -> str:
        return self.record.topology


def _fresh(beat: bytes, now: float) -> bool:
    try:
        ts, ttl = (float(x) for x in beat.split())
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError):  # garbage, or not a string value
        return False
    # "inf"/"nan" parse as floats: an infinite timestamp or TTL would make a record fresh forever
    return math.isfinite(ts) and math.isfinite(ttl) and ttl > 0 and now - ts <= ttl


def _count(value: object) -> int:
    """A readers counter as Redis holds it; garbage counts as no readers (it only orders candidates)."""
    try:
        return max(0, int(value or 0))  # type: ignore[call-overload]
    except (ValueError, TypeError):
        return 0


def open_record(keys: Keyring, key: str, blob: bytes, max_bytes: int) -> SourceRecord:
    """A source record from its Redis value: seal checked first (AuthError), then decoded (ProtocolError)."""
    return decode(SourceRecord, keys.unseal("record", key, blob, max_bytes), max_bytes)


class Coordinator:
    def __init__(self, client: aioredis.Redis, prefix: str, replica_id: str, node: str, source_ttl: float,
                 max_record_bytes: int, max_metadata_bytes: int, keys: Keyring,
                 on_auth_fail: Callable[[str, str], None] = lambda who, reason: None, topology: str = "") -> None:
        self._r = client  # from sidecar.redis_client.connect(cfg): AUTH and TLS are set up there
        self._keys = keys
        self._on_auth_fail = on_auth_fail
        self._key_of = RedisKeys(prefix)
        self.replica_id = replica_id
        self._node = node
        self._topology = topology
        self._ttl_ms = int(source_ttl * 1000)
        self._ttl_s = source_ttl
        self._max_record = max_record_bytes
        self._max_meta = max_metadata_bytes

    async def _call(self, what: str, coro):  # type: ignore[no-untyped-def]
        try:
            return await coro
        except (RedisError, OSError) as e:
            raise CoordinatorUnavailable(f"redis {what}: {describe_error(e)}") from e

    async def ping(self) -> None:
        await self._call("ping", self._r.ping())

    # -------------------------------------------------------------- seeding lease
    async def try_seed(self, fp: str, ttl: float) -> bool:
        ok = await self._call("seed", self._r.set(self._key_of.seed(fp), self.replica_id, nx=True, px=int(ttl * 1000)))
        return bool(ok)

    async def renew_seed(self, fp: str, ttl: float) -> bool:
        r = await self._call("renew", self._r.eval(_RENEW_LUA, 1, self._key_of.seed(fp), self.replica_id,
                                                   int(ttl * 1000)))
        return bool(r)

    async def release_seed(self, fp: str) -> None:
        await self._call("release", self._r.eval(_RELEASE_LUA, 1, self._key_of.seed(fp), self.replica_id))

    async def seeder(self, fp: str) -> str | None:
        v = await self._call("seeder", self._r.getrange(self._key_of.seed(fp), 0, MAX_REPLICA_ID_CHARS))
        return v.decode(errors="replace")[:MAX_REPLICA_ID_CHARS] if v else None  # only ever logged

    # -------------------------------------------------------------- agents
    async def put_agent(self, name: str, metadata: bytes) -> None:
        key = self._key_of.agent(name)
        await self._call("put_agent", self._r.set(key, self._keys.seal("agent", key, metadata, secret=True),
                                                   px=self._ttl_ms))

    async def agent_published(self, name: str) -> bool:
        """Whether `name`'s metadata is still in Redis: a reader refreshes it while it receives (its liveness)."""
        return bool(await self._call("agent_published", self._r.exists(self._key_of.agent(name))))

    async def get_agent(self, name: str) -> bytes:
        """The agent's NIXL metadata; AuthError if its seal is missing or wrong (a foreign agent)."""
        key = self._key_of.agent(name)
        blob = await self._call("get_agent", self._r.getrange(key, 0, self._max_meta + 1024))
        if not blob:
            raise ProtocolError(f"no metadata for agent {name!r} in Redis")
        if len(blob) > self._max_meta + 1024:
            raise ProtocolError(f"agent metadata of {len(blob)} bytes exceeds {self._max_meta}")
        try:
            return self._keys.unseal("agent", key, bytes(blob), self._max_meta + 1024, secret=True)
        except AuthError as e:
            self._on_auth_fail(name, e.reason)
            raise

    # -------------------------------------------------------------- sources
    async def publish(self, rec: SourceRecord, agent_names: list[str]) -> None:
        fp, rid = rec.fingerprint, rec.replica
        pipe = self._r.pipeline(transaction=True)
        key = self._key_of.record(fp, rid)
        pipe.set(key, self._keys.seal("record", key, encode(rec)), px=self._ttl_ms)
        pipe.set(self._key_of.heartbeat(fp, rid), self._beat(), px=self._ttl_ms)
        pipe.sadd(self._key_of.sources(fp), rid)
        await self._call("publish", pipe.execute())
        log.info("published %s as a source of %s (%d ranks)", rid, fp[:12], len(rec.ranks))

    async def heartbeat(self, fp: str, agent_names: list[str]) -> bool:
        """Tiny beat. False when Redis forgot the record (restart, eviction): the caller re-publishes."""
        pipe = self._r.pipeline(transaction=False)
        pipe.set(self._key_of.heartbeat(fp, self.replica_id), self._beat(), px=self._ttl_ms)
        pipe.pexpire(self._key_of.record(fp, self.replica_id), self._ttl_ms)
        for a in agent_names:
            pipe.pexpire(self._key_of.agent(a), self._ttl_ms)
        res = await self._call("heartbeat", pipe.execute())
        return bool(res[1]) and all(bool(x) for x in res[2:])

    def _beat(self) -> str:
        # The source's own TTL travels with the beat: a reader configured with a shorter TTL must not call a
        # source stale that beats as often as *its* settings ask (seen: TTL 3 s reader vs 5 s heartbeats).
        return f"{time.time()!r} {self._ttl_s!r}"

    async def withdraw(self, fp: str, agent_names: list[str]) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.srem(self._key_of.sources(fp), self.replica_id)
        pipe.delete(self._key_of.record(fp, self.replica_id), self._key_of.heartbeat(fp, self.replica_id),
                    self._key_of.readers(fp, self.replica_id), *[self._key_of.agent(a) for a in agent_names])
        await self._call("withdraw", pipe.execute())
        log.info("withdrew %s from the sources of %s", self.replica_id, fp[:12])

    async def live_sources(self, fp: str) -> list[Candidate]:
        """Fresh sources, best first (sidecar.choice: same node, topology, least loaded). Stale members are pruned."""
        members = await self._call("sources", self._r.eval(_MEMBERS_LUA, 1, self._key_of.sources(fp),
                                                           MAX_SOURCE_MEMBERS, MAX_REPLICA_ID_CHARS))
        out: list[Candidate] = []
        now = time.time()
        for m in members[:MAX_SOURCE_MEMBERS]:
            try:
                rid = m.decode()
            except UnicodeDecodeError:
                rid = ""
            if not rid or len(rid) > MAX_REPLICA_ID_CHARS:
                log.warning("ignoring a sources member that is no replica id: %r", m[:80])
                continue
            if rid == self.replica_id or ":" in rid:
                continue
            hb, blob, readers = await self._call("source", self._get3(fp, rid))
            if any(isinstance(x, Exception) for x in (hb, blob, readers)):  # e.g. WRONGTYPE: not string values
                log.warning("ignoring source %s: its keys hold values of another type", rid)
                continue
            if not hb or not blob:  # GETRANGE reads a missing key as empty
                await self._call("prune", self._r.srem(self._key_of.sources(fp), rid))
                continue
            if not _fresh(hb, now):  # freshness check on top of the key's TTL
                continue
            cand = self._candidate(self._key_of.record(fp, rid), fp, rid, blob, readers)
            if cand is not None:
                out.append(cand)
        return rank_sources(out, self._topology, self.replica_id)

    def _candidate(self, key: str, fp: str, rid: str, blob: bytes, readers: object) -> Candidate | None:
        """A source from its sealed record, or None (refused: counted and logged)."""
        try:
            rec = open_record(self._keys, key, blob, self._max_record)
        except AuthError as e:
            self._on_auth_fail(rid, e.reason)
            return None
        except ProtocolError as e:
            log.warning("ignoring source %s: %s", rid, e)
            return None
        if rec.fingerprint != fp or rec.replica != rid:
            log.warning("ignoring source %s: record names another replica or model", rid)
            return None
        return Candidate(rec, _count(readers), rec.node == self._node)

    async def sources_of_model(self, model: str) -> list[Candidate]:
        """Fresh sources of every fingerprint whose record names `model`. Read-only.

        For file-level targets (runtime_hooks/files/receiver.py), which learn the fingerprint from the source's
        record. A SCAN over `P:*:src:*`: fine for tens of models; a `P:model:M` index would make it O(1).
        """
        out: list[Candidate] = []
        now = time.time()
        try:
            keys = [k.decode() async for k in self._r.scan_iter(match=self._key_of.every_record(), count=1000)]
        except (RedisError, OSError) as e:
            raise CoordinatorUnavailable(f"redis scan: {e}") from e
        for key in keys:
            parsed = self._key_of.per_replica(key, "src")
            if parsed is None:
                continue
            fp, rid = parsed.fingerprint, parsed.replica
            hb, blob, readers = await self._call("source", self._get3(fp, rid))
            if any(isinstance(x, Exception) for x in (hb, blob, readers)):  # e.g. WRONGTYPE: not string values
                continue
            if hb is None or blob is None or not _fresh(hb, now) or len(blob) > self._max_record:
                continue
            try:
                if _head_decoder.decode(decode(Sealed, blob, self._max_record).body).model != model:
                    continue
            except (msgspec.DecodeError, ProtocolError) as e:
                log.warning("ignoring source %s: %s", rid, e)
                continue
            cand = self._candidate(key, fp, rid, blob, readers)
            if cand is not None:
                out.append(cand)
        return rank_sources(out, self._topology, self.replica_id)

    async def _get3(self, fp: str, rid: str):  # type: ignore[no-untyped-def]
        pipe = self._r.pipeline(transaction=False)
        pipe.getrange(self._key_of.heartbeat(fp, rid), 0, MAX_BEAT_BYTES)
        pipe.getrange(self._key_of.record(fp, rid), 0, self._max_record)  # one byte past the limit: refused, not cut
        pipe.getrange(self._key_of.readers(fp, rid), 0, MAX_COUNTER_BYTES)
        return await pipe.execute(raise_on_error=False)  # a wrong-typed key filters this source, not the choice

    async def reader_delta(self, fp: str, rid: str, delta: int) -> None:
        key = self._key_of.readers(fp, rid)
        pipe = self._r.pipeline(transaction=True)
        pipe.incrby(key, delta)
        pipe.pexpire(key, self._ttl_ms * 30)
        await self._call("readers", pipe.execute())

    async def close(self) -> None:
        await self._r.aclose()
