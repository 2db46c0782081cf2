"""Bounds on everything read from outside: slot sizes and counts, chunk counts, list lengths and Redis value sizes,
checked before anything is allocated on their say-so."""

from __future__ import annotations

import time
import tracemalloc

import msgspec
import pytest

from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.codec import decode
from sidecar.contract.messages import (
    MAX_CHUNKS_PER_RANK,
    MAX_SLOTS,
    MAX_TENSORS,
    MIN_SLOT_BYTES,
    PROTOCOL_VERSION,
    ProtocolError,
    RankSource,
    SourceRecord,
    TensorEntry,
    encode,
)
from sidecar.coordinator import MAX_SOURCE_MEMBERS, Coordinator
from sidecar.errors import PlanError
from sidecar.planner import chunk_plan
from sidecar.redis_client import connect
from sidecar.settings import ConfigError


def test_staging_slots_below_64_kib_or_above_the_caps_are_rejected_at_start():
    assert MIN_SLOT_BYTES == 64 << 10
    assert Config.from_env({"MX_STAGING_SLOT_BYTES": "64KiB"}).staging_slot_bytes == MIN_SLOT_BYTES
    for bad in ("4096", "63KiB", "32GiB"):
        with pytest.raises(ConfigError, match="MX_STAGING_SLOT_BYTES"):
            Config.from_env({"MX_STAGING_SLOT_BYTES": bad})
    with pytest.raises(ConfigError, match="MX_STAGING_SLOTS"):
        Config.from_env({"MX_STAGING_SLOTS": str(MAX_SLOTS + 1)})


def _record(slots: list[tuple[int, int]], entries: int = 1) -> SourceRecord:
    es = [TensorEntry(f"t{i}", "uint8", [16], 0, 16 * i, 16) for i in range(entries)]
    return SourceRecord(PROTOCOL_VERSION, "r", "n", "m", "f" * 32, [RankSource(0, "a", "DRAM", 0, "staged", es,
                                                                              ["xxh3:0"] * entries, slots=slots)])


def test_a_record_whose_slots_are_too_small_or_too_many_is_refused():
    decode(SourceRecord, encode(_record([(1 << 20, MIN_SLOT_BYTES)])))
    with pytest.raises(ProtocolError, match=r">= 65536.*slots"):
        decode(SourceRecord, encode(_record([(1 << 20, MIN_SLOT_BYTES - 1)])))
    with pytest.raises(ProtocolError, match=f"length <= {MAX_SLOTS}"):
        decode(SourceRecord, encode(_record([(1 << 20, MIN_SLOT_BYTES)] * (MAX_SLOTS + 1))))
    with pytest.raises(ProtocolError, match=">= 0"):
        decode(SourceRecord, encode(_record([(-1, MIN_SLOT_BYTES)])))


def test_an_oversized_entry_list_is_refused_from_its_header_before_decoding_it():
    data = encode(_record([(1 << 20, MIN_SLOT_BYTES)], entries=MAX_TENSORS + 1))
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ProtocolError, match=f"length <= {MAX_TENSORS}"):
        decode(SourceRecord, data)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20 and elapsed < 0.5, (peak, elapsed)  # 200k entries would take ~100 MB and seconds


def test_a_plan_of_more_chunks_than_the_cap_is_refused_before_it_is_built():
    huge = [TensorEntry("w", "uint8", [1 << 40], 0, 0, 1 << 40)]
    t0 = time.perf_counter()
    with pytest.raises(PlanError, match="chunks per rank"):
        chunk_plan(huge, MIN_SLOT_BYTES)  # 16M chunks
    assert time.perf_counter() - t0 < 0.1
    many_small = [TensorEntry(f"t{i}", "uint8", [1], 0, i, 1) for i in range(50)]
    with pytest.raises(PlanError, match="exceeds 10 chunks"):
        chunk_plan(many_small, 256, max_chunks=10)  # the estimate says 1 chunk; alignment makes it 50
    assert len(chunk_plan(many_small, 256, max_chunks=50)) == 50
    assert MAX_CHUNKS_PER_RANK == 1 << 20


async def test_redis_values_are_read_only_up_to_their_limits(redis_server):
    r = redis_server.admin()
    fp = "f" * 32
    r.set("mx:agent:big", b"x" * (2 << 20))
    r.sadd(f"mx:{fp}:sources", b"y" * (1 << 20), *[f"member-{i}" for i in range(5000)])
    coord = Coordinator(connect(Config.from_env({"MX_REDIS_URL": redis_server.url})), "mx", "me", "n", 10.0,
                        1 << 16, 1 << 20, Keyring(None))
    try:
        with pytest.raises(ProtocolError, match="exceeds 1048576"):
            await coord.get_agent("big")
        t0 = time.perf_counter()
        before = r.info("stats")["total_commands_processed"]
        assert await coord.live_sources(fp) == []  # members without records: pruned, at most the cap per call
        asked = r.info("stats")["total_commands_processed"] - before
        assert asked <= 4 * MAX_SOURCE_MEMBERS + 10, asked  # 3 GETRANGE + 1 SREM per member looked at
        assert r.scard(f"mx:{fp}:sources") >= 5000 - MAX_SOURCE_MEMBERS
        assert time.perf_counter() - t0 < 30
    finally:
        await coord.close()


def test_a_published_record_with_tiny_slots_is_refused_and_the_replica_loads_from_storage(replicas, redis_server):
    from tests.test_end_to_end import _metric, _tamper_record

    ring = {"MX_SOURCE_MODE": "staged", "MX_STAGING_SLOTS": "2", "MX_STAGING_SLOT_BYTES": "1MiB",
            "MX_HEARTBEAT_INTERVAL": "5", "MX_SOURCE_TTL": "30"}
    a = replicas("a", extra_env=ring)
    res_a = a.engine_results()
    a.wait_serving()
    _tamper_record(redis_server.url, lambda rank: msgspec.structs.replace(
        rank, slots=[(addr, 4096) for addr, _ in rank.slots]))
    b = replicas("b", extra_env=ring)
    res_b = b.engine_results(timeout=60)
    assert res_b[0]["outcome"] == res_b[1]["outcome"] == "loaded" and res_b[0]["digests"] == res_a[0]["digests"]
    b.sidecar.wait_for(r"ignoring source .*>= 65536", 5)
    _, text = b.http("/metrics")
    assert _metric(text, "mx_sources_visible") == 0 and "mx_transfers_total{" not in text


