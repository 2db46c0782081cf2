"""Replicas made of real processes: toy engine + `python -m sidecar run`, real Redis, real NIXL over DRAM."""

from __future__ import annotations

import contextlib
import re
import signal
import time

import redis

from sidecar.contract.codec import decode
from sidecar.contract.messages import Sealed, SourceRecord


def _record(blob: bytes):  # type: ignore[no-untyped-def]
    return decode(SourceRecord, decode(Sealed, blob).body)


def _sources(url: str, prefix: str = "mx") -> list[str]:
    r = redis.Redis.from_url(url)
    return [_record(r.get(k)).replica for k in r.scan_iter(f"{prefix}:*:src:*") if r.get(k)]


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} {labels} not in metrics")


def _hook_state(address: str, rank: int = 0) -> str:
    """Rank `rank`'s state, from a ping on its hook socket (as any sidecar sees it)."""
    import zmq

    from sidecar.contract.codec import PROTOCOL_VERSION, encode
    from sidecar.contract.messages import Reply, Request

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address.replace(".sock", f"-{rank}.sock"))
    try:
        s.send(encode(Request(PROTOCOL_VERSION, 1, "ping", "test")))
        return str(decode(Reply, s.recv()).state)
    finally:
        s.close()


def _wedged_source(replicas):  # type: ignore[no-untyped-def]
    """A source that is in Redis (long TTL) and answers nothing: a target that pulls from it waits mid-receive."""
    a = replicas("a", extra_env={"MX_HEARTBEAT_INTERVAL": "5", "MX_SOURCE_TTL": "30"})
    a.engine_results()
    a.wait_serving()
    a.sidecar.signal(signal.SIGSTOP)
    return a


def _assert_fell_back_to_storage(b, res_a, result: str) -> None:  # type: ignore[no-untyped-def]
    """Replica b's one attempt failed with `result`; its engine loaded from storage, bytes equal to a's."""
    res_b = b.engine_results(timeout=60)
    assert res_b[0]["outcome"] == res_b[1]["outcome"] == "loaded"
    assert res_b[0]["digests"] == res_a[0]["digests"]
    _, text = b.http("/metrics")
    assert _metric(text, "mx_transfers_total", role="target", result=result) == 1
    assert _metric(text, "mx_transfers_total", role="target", result="fell_back_to_storage") == 1


def test_first_replica_loads_from_storage_and_second_receives_identical_bytes_tp2(replicas):
    a = replicas("a")
    res_a = a.engine_results()
    assert [res_a[r]["outcome"] for r in (0, 1)] == ["loaded", "loaded"]
    a.wait_serving()
    b = replicas("b")
    res_b = b.engine_results()
    assert [res_b[r]["outcome"] for r in (0, 1)] == ["received", "received"]
    for r in (0, 1):
        assert res_b[r]["digests"] == res_a[r]["digests"]
        assert len(res_b[r]["digests"]) == res_a[r]["tensors"] > 20
    assert res_a[0]["digests"] != res_a[1]["digests"], "ranks must hold different shards"


def test_a_target_whose_agent_is_made_only_at_import_publishes_it_before_its_hello_and_receives(replicas):
    """On a GPU machine the agents made ahead are the GPUs'; a receive into host memory (the compile cache's files)
    makes its agent at import. Measured on an H100: that agent's metadata was never put, the source refused the
    Hello ("no metadata for agent") and the target fell back after its Welcome timeout. The failpoint makes no
    agent ahead, so the same happens on the CPU."""
    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    b = replicas("b", extra_env={"MX_TEST_FAILPOINTS": "agents_early=raise"})
    res_b = b.engine_results()
    assert [res_b[r]["outcome"] for r in (0, 1)] == ["received", "received"]
    assert a.sidecar is not None and not any("no metadata for agent" in ln for ln in a.sidecar.lines)


def test_a_third_replica_copies_from_a_target_turned_source(replicas, redis_server):
    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    b = replicas("b")
    assert b.engine_results()[0]["outcome"] == "received"
    b.wait_serving()
    a.sidecar.stop()  # only the target-turned-source is left
    deadline = time.monotonic() + 10
    while len(_sources(redis_server.url)) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    c = replicas("c")
    res_c = c.engine_results()
    assert res_c[0]["outcome"] == res_c[1]["outcome"] == "received"
    b_id = re.search(r"published (\S+) as a source", "\n".join(b.sidecar.lines)).group(1)
    assert c.sidecar.wait_for(rf"pulling .* from {re.escape(b_id)}", 5)


def test_replicas_of_different_fingerprints_never_copy_from_each_other(replicas, other_checkpoint):
    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    b = replicas("b", checkpoint=other_checkpoint)  # float32: another build of the "same" model
    c = replicas("c", revision="r2")  # another revision
    for rep in (b, c):
        res = rep.engine_results()
        assert res[0]["outcome"] == res[1]["outcome"] == "loaded"
        rep.sidecar.wait_for(r"phase=role .*: seed \(0 live sources\)", 5)
        _, text = rep.http("/metrics")
        assert "mx_transfers_total{" not in text, "no transfer may even be attempted"
        assert _metric(text, "mx_sources_visible") == 0


def test_metrics_expose_transfer_figures_after_a_transfer(replicas):
    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    b = replicas("b")
    res = b.engine_results()
    b.wait_serving()
    total = sum(res[r]["bytes"] for r in (0, 1))
    status, text = b.http("/metrics")
    assert status == 200
    assert _metric(text, "mx_transfer_bytes_total", role="target", rank="0") == res[0]["bytes"]
    assert _metric(text, "mx_transfer_bytes_total", role="target", rank="1") == res[1]["bytes"]
    assert _metric(text, "mx_transfers_total", role="target", result="ok") == 1
    assert _metric(text, "mx_transfer_duration_seconds_count", role="target") == 1
    assert _metric(text, "mx_last_transfer_bytes_per_second", role="target") > 0
    assert _metric(text, "mx_source_published") == 1
    assert _metric(text, "mx_role", role="serving") == 1 and _metric(text, "mx_role", role="target") == 0
    assert _metric(text, "mx_sources_visible") == 1
    assert _metric(text, "mx_registered_bytes", kind="engine") >= total
    assert _metric(text, "mx_time_to_ready_seconds", role="target") > 0
    assert _metric(text, "mx_role_decisions_total", decision="target") == 1
    assert b.http("/healthz")[0] == 200 and b.http("/readyz")[0] == 200
    deadline = time.monotonic() + 5  # the source counts a session when the reader's Bye arrives
    while True:
        _, text_a = a.http("/metrics")
        if "mx_serve_sessions_total{" in text_a or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert _metric(text_a, "mx_serve_sessions_total", result="ok") == 2  # one per rank
    assert _metric(text_a, "mx_role_decisions_total", decision="seed") == 1


def test_sigterm_on_a_source_removes_it_from_redis(replicas, redis_server):
    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    assert len(_sources(redis_server.url)) == 1
    a.sidecar.signal(signal.SIGTERM)
    assert a.sidecar.p.wait(10) == 0
    assert _sources(redis_server.url) == []
    assert not [k for k in redis.Redis.from_url(redis_server.url).scan_iter("mx:*") if b":seed" not in k]


def test_staged_mode_moves_identical_bytes_through_a_small_ring_on_cpu(replicas):
    ring = {"MX_SOURCE_MODE": "staged", "MX_STAGING_SLOT_BYTES": "64KiB", "MX_STAGING_SLOTS": "3"}
    a = replicas("a", extra_env=ring)
    res_a = a.engine_results()
    a.wait_serving()
    b = replicas("b", extra_env=ring)
    res_b = b.engine_results()
    assert [res_b[r]["outcome"] for r in (0, 1)] == ["received", "received"]
    assert all(res_b[r]["digests"] == res_a[r]["digests"] for r in (0, 1))
    b.sidecar.wait_for(r"phase=transfer .* staged", 5)


def test_replicas_started_together_read_storage_once(replicas):
    reps = [replicas(n) for n in ("a", "b", "c")]
    outcomes = sorted(rep.engine_results(timeout=120)[0]["outcome"] for rep in reps)
    why = [line for rep in reps for line in rep.sidecar.lines if " WARNING " in line or "phase=role" in line]
    assert outcomes == ["loaded", "received", "received"], "\n".join(why)


def test_a_seeder_whose_publish_outlasts_its_lease_keeps_it_and_the_next_replica_receives(replicas):
    # The lease is 3 s (FAST_ENV); the publish is held 5 s. A lease renewed only through the load expired here and
    # the second replica read storage too.
    a = replicas("a", extra_env={"MX_TEST_FAILPOINTS": "before_publish=sleep:5"})
    a.sidecar.wait_for(r"phase=load_from_storage", 30)
    b = replicas("b")
    assert a.engine_results()[0]["outcome"] == "loaded"
    assert [b.engine_results(timeout=60)[r]["outcome"] for r in (0, 1)] == ["received", "received"]
    assert not any("seeding lease lost" in line for line in a.sidecar.lines)


def test_redis_down_still_starts_the_engine_from_storage(replicas, redis_server):
    redis_server.stop()
    a = replicas("a")
    res = a.engine_results()
    assert res[0]["outcome"] == "loaded"
    a.sidecar.wait_for(r"Redis unavailable", 5)
    _, text = a.http("/metrics")
    assert _metric(text, "mx_role_decisions_total", decision="redis_down") == 1
    assert _metric(text, "mx_redis_errors_total", op="decide") >= 1


def test_source_republishes_after_a_redis_restart(replicas, redis_server):
    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    redis_server.restart()  # empty memory, same socket
    a.sidecar.wait_for(r"Redis forgot this source", 15)
    deadline = time.monotonic() + 10
    while not _sources(redis_server.url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_sources(redis_server.url)) == 1
    b = replicas("b")
    assert b.engine_results()[0]["outcome"] == "received"


def test_without_a_sidecar_the_engine_starts_from_storage(replicas):
    a = replicas("a", sidecar=False, sidecar_timeout=1.0)
    res = a.engine_results(timeout=30)
    assert res[0]["outcome"] == res[1]["outcome"] == "loaded_without_sidecar"


def test_source_killed_mid_transfer_falls_back_to_storage(replicas):
    # A tiny ring and slow pacing would be fragile; instead the source's sidecar dies right after publishing
    # and before the target pulls: the record is still fresh in Redis, the READ finds a dead agent.
    a = replicas("a", extra_env={"MX_SOURCE_TTL": "30", "MX_HEARTBEAT_INTERVAL": "5"})
    res_a = a.engine_results()
    a.wait_serving()
    a.sidecar.signal(signal.SIGKILL)
    a.sidecar.p.wait(5)
    b = replicas("b", extra_env={"MX_STALL_TIMEOUT": "3"})
    _assert_fell_back_to_storage(b, res_a, "source_failed")


def test_garbage_on_the_engine_socket_and_nixl_channel_is_rejected_and_the_source_keeps_serving(replicas,
                                                                                                redis_server):
    import msgpack
    import zmq

    from sidecar.contract.codec import PROTOCOL_VERSION
    from sidecar.contract.messages import Reply
    from sidecar.transport import Transport

    a = replicas("a")
    res_a = a.engine_results()
    a.wait_serving()
    # 1. The engine hook's socket: malformed, wrong version, unknown op, unknown field.
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(a.address.replace(".sock", "-0.sock"))
    bad_frames = (b"\xc1\xc1", msgpack.packb({"v": 9, "id": 1, "op": "ping"}),
                  msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, "op": "shutdown"}),
                  msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, "op": "ping", "z": 1}))
    for bad in bad_frames:
        s.send(bad)
        reply = decode(Reply, s.recv())
        assert not reply.ok and reply.error
    s.close()
    # 2. The sidecar's NIXL notification channel: a real agent sends garbage and a forged Hello.
    r = redis.Redis.from_url(redis_server.url)
    rec = _record(r.get(next(iter(r.scan_iter("mx:*:src:*")))))
    intruder = Transport("intruder", "DRAM", 0)
    peer = intruder.add_peer(decode(Sealed, r.get(f"mx:agent:{rec.ranks[0].agent}")).body, rec.ranks[0].agent)
    intruder.send(peer, b"\x00not msgpack")
    intruder.send(peer, msgpack.packb({"type": "hello", "v": PROTOCOL_VERSION, "session": "s", "rank": 0,
                                       "reader": "nobody", "layout_digest": "x", "ts": time.time()}))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        intruder.agent.get_new_notifs()  # no progress thread: this drives the intruder's sends
        _, text = a.http("/metrics")
        if "mx_bad_messages_total{" in text and "mx_serve_sessions_total{" in text:
            break
        time.sleep(0.05)
    assert _metric(text, "mx_bad_messages_total", channel="nixl") >= 1
    assert _metric(text, "mx_serve_sessions_total", result="refused") >= 1
    intruder.close()
    # 3. Still serving: a real target receives identical bytes.
    b = replicas("b")
    res_b = b.engine_results()
    assert res_b[0]["outcome"] == "received" and res_b[0]["digests"] == res_a[0]["digests"]


def test_a_source_that_stops_heartbeating_disappears_within_the_ttl(replicas, redis_server):
    a = replicas("a")  # FAST_ENV: heartbeat 0.5 s, TTL 3 s
    a.engine_results()
    a.wait_serving()
    a.sidecar.signal(signal.SIGKILL)  # no withdrawal: only the TTL can remove it
    a.sidecar.p.wait(5)
    t0 = time.monotonic()
    while _sources(redis_server.url) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert _sources(redis_server.url) == []
    assert time.monotonic() - t0 <= 3.5


def test_a_dead_seeders_lease_expires_and_a_waiting_replica_seeds_instead(replicas, redis_server, checkpoint):
    # Learn the fingerprint from a first replica, then clear Redis and plant a lease as if its seeder had died.
    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    fp = re.search(r"fingerprint (\w+)", "\n".join(a.sidecar.lines)).group(1)
    a.stop()
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.set(f"mx:{fp}:seed", "dead-seeder-1", px=8000)
    b = replicas("b")
    b.sidecar.wait_for(r"waiting for seeder dead-seeder-1", 15)
    res = b.engine_results(timeout=30)
    assert res[0]["outcome"] == "loaded"
    b.sidecar.wait_for(r"phase=role .*: seed", 5)


def _tamper_record(url: str, edit) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the one source record in Redis (as a compromised or buggy writer could), keeping its TTL."""
    import msgspec

    from sidecar.contract.codec import encode

    r = redis.Redis.from_url(url)
    key = next(iter(r.scan_iter("mx:*:src:*")))
    sealed = decode(Sealed, r.get(key))
    rec = decode(SourceRecord, sealed.body)
    ranks = [edit(rank) for rank in rec.ranks]
    body = encode(msgspec.structs.replace(rec, ranks=ranks))  # the MAC stays the old one: valid only without a key
    r.set(key, encode(msgspec.structs.replace(sealed, body=body)), keepttl=True)


def test_a_forged_record_that_would_write_past_a_tensor_is_refused_before_any_byte_moves(replicas, redis_server):
    import msgspec

    a = replicas("a", extra_env={"MX_HEARTBEAT_INTERVAL": "5", "MX_SOURCE_TTL": "30"})
    res_a = a.engine_results()
    a.wait_serving()

    def stretch(rank):  # type: ignore[no-untyped-def]
        entries = [msgspec.structs.replace(e, nbytes=e.nbytes * 64) if e.nbytes else e for e in rank.entries]
        return msgspec.structs.replace(rank, entries=entries)

    _tamper_record(redis_server.url, stretch)
    b = replicas("b")
    res_b = b.engine_results(timeout=60)
    assert res_b[0]["outcome"] == res_b[1]["outcome"] == "loaded"  # from storage, never from the forged plan
    assert res_b[0]["digests"] == res_a[0]["digests"]
    _, text = b.http("/metrics")
    assert _metric(text, "mx_transfers_total", role="target", result="refused_layout") == 1
    assert "mx_transfer_bytes_total{" not in text or _metric(text, "mx_transfer_bytes_total", rank="0") == 0


def test_a_checksum_mismatch_keeps_the_engine_blocked_and_falls_back_to_storage(replicas, redis_server):
    import msgspec

    a = replicas("a", extra_env={"MX_HEARTBEAT_INTERVAL": "5", "MX_SOURCE_TTL": "30"})
    res_a = a.engine_results()
    a.wait_serving()

    def corrupt(rank):  # type: ignore[no-untyped-def]
        sums = list(rank.checksums)
        sums[len(sums) // 2] = "xxh3:0000000000000000"
        return msgspec.structs.replace(rank, checksums=sums)

    _tamper_record(redis_server.url, corrupt)
    b = replicas("b")
    # The bytes moved, did not verify, and the engine was never released on them: it loaded from storage.
    _assert_fell_back_to_storage(b, res_a, "verify_failed")


def test_a_target_sidecar_stopped_mid_receive_voids_the_bytes_and_the_engine_waits_again(replicas):
    a = _wedged_source(replicas)
    try:
        b = replicas("b", sidecar_timeout=30, extra_env={"MX_STALL_TIMEOUT": "20"})
        b.sidecar.wait_for(r"pulling .* from", 30)
        b.sidecar.signal(signal.SIGTERM)
        assert b.sidecar.p.wait(15) == 0
        assert _hook_state(b.address) == "waiting", "the half-received bytes must be void, the engine blocked"
    finally:
        a.sidecar.signal(signal.SIGCONT)


def test_a_target_ends_with_the_numbers_its_source_derived_from_the_weights_and_publishes_them(replicas,
                                                                                                redis_server):
    a = replicas("a")
    res_a = a.engine_results()
    a.wait_serving()
    b = replicas("b")
    res_b = b.engine_results()
    assert [res_b[r]["outcome"] for r in (0, 1)] == ["received", "received"]
    for r in (0, 1):  # re-derived from the received bytes, not kept from the dummy ones
        assert res_b[r]["derived"] == res_a[r]["derived"] != 0.0
    b.sidecar.wait_for(r"phase=derive 2 derived numbers equal the source's", 10)
    b.wait_serving()
    r = redis.Redis.from_url(redis_server.url)
    for key in r.scan_iter("mx:*:src:*"):
        rec = _record(r.get(key))
        assert all(list(rank.derived) == ["model.norm.scale"] for rank in rec.ranks), rec.replica


def test_a_target_whose_engine_derives_other_numbers_from_the_same_bytes_stays_blocked_and_loads_from_storage(
        replicas):
    a = replicas("a")
    res_a = a.engine_results()
    a.wait_serving()
    b = replicas("b", engine_args=["--stale-derived"])
    # Every checksum matched; the number the engine kept did not: never released on it, loaded from storage.
    _assert_fell_back_to_storage(b, res_a, "derived_mismatch")
    b.sidecar.wait_for(r"derived state differs: rank \d: 1 numbers .* e\.g\. model\.norm\.scale", 10)
    res_b = b.engine_results()
    assert res_b[0]["derived"] == res_a[0]["derived"]


def test_a_sidecar_restarted_during_its_own_storage_load_waits_for_it_then_serves_without_an_exit_loop(replicas):
    a = replicas("a", engine_args=["--load-delay", "6"])
    a.sidecar.wait_for(r"phase=role .*: seed", 30)
    deadline = time.monotonic() + 10
    while _hook_state(a.address) != "loading":  # the sidecar's load_from_storage reached the engine
        assert time.monotonic() < deadline, "the engine never began loading"
        time.sleep(0.05)
    a.sidecar.signal(signal.SIGKILL)  # the sidecar container died while its engine reads storage
    a.sidecar.p.wait(10)
    restarted = a.new_sidecar()
    restarted.wait_for(r"2 ranks are loading from storage .* waiting for the load to end", 30)
    res_a = a.engine_results()
    assert [res_a[r]["outcome"] for r in (0, 1)] == ["loaded", "loaded"]
    restarted.wait_for(r"phase=await_load [\d.]+s: ranks are \['ready', 'ready'\]", 30)
    a.wait_serving()
    assert restarted.p.poll() is None, "no exit (exit 2 and a crash-loop back-off before)"
    b = replicas("b")
    res_b = b.engine_results()
    assert res_b[0]["outcome"] == "received" and res_b[0]["digests"] == res_a[0]["digests"]


@contextlib.contextmanager
def _sigterm_mid_receive(replicas, stall_s: int, drain_s: int):  # type: ignore[no-untyped-def]
    """A target pulling from a wedged source whose drain takes `drain_s` (a failpoint standing for READs still in
    flight), SIGTERMed mid-receive; yields (target, time of the SIGTERM)."""
    a = _wedged_source(replicas)
    try:
        b = replicas("b", sidecar_timeout=30,
                     extra_env={"MX_STALL_TIMEOUT": str(stall_s), "MX_TEST_FAILPOINTS": f"drain=sleep:{drain_s}"})
        b.sidecar.wait_for(r"pulling .* from", 30)
        b.sidecar.signal(signal.SIGTERM)
        yield b, time.monotonic()
    finally:
        a.sidecar.signal(signal.SIGCONT)


def test_sigterm_mid_receive_waits_for_the_read_drain_before_it_aborts(replicas):
    with _sigterm_mid_receive(replicas, stall_s=20, drain_s=4) as (b, t0):  # the drain fits MX_STALL_TIMEOUT
        while time.monotonic() - t0 < 3:  # no verdict, not even abort, while the READs may land
            assert _hook_state(b.address) == "receiving"
            time.sleep(0.2)
        assert b.sidecar.p.wait(20) == 0
        assert time.monotonic() - t0 >= 4
        assert _hook_state(b.address) == "waiting", "the drained attempt is void: the engine waits again"


def test_sigterm_mid_receive_with_a_drain_it_cannot_confirm_exits_without_a_verdict(replicas):
    with _sigterm_mid_receive(replicas, stall_s=3, drain_s=5) as (b, _):
        assert b.sidecar.p.wait(20) == 4  # exit code of a fence failure (sidecar/errors.py)
        b.sidecar.wait_for(r"exiting WITHOUT a verdict", 5)
        assert _hook_state(b.address) == "receiving", "no abort: READs may still land; a new sidecar takes over"


def test_a_teardown_that_never_ends_still_exits_with_the_lifes_code_within_the_shutdown_limit(replicas):
    from sidecar.daemon import SHUTDOWN_LIMIT_S

    a = replicas("a", extra_env={"MX_TEST_FAILPOINTS": "teardown=sleep:120"})
    a.engine_results()
    a.wait_serving()
    t0 = time.monotonic()
    a.sidecar.signal(signal.SIGTERM)
    assert a.sidecar.p.wait(SHUTDOWN_LIMIT_S + 10) == 0  # a SIGTERM's code, not the kubelet's SIGKILL
    assert SHUTDOWN_LIMIT_S <= time.monotonic() - t0 < SHUTDOWN_LIMIT_S + 10
    a.sidecar.wait_for(r"shutdown still not finished after \d+s", 5)


def test_after_a_stalled_first_source_the_second_serves_within_one_stall_timeout(replicas, redis_server):
    long_ttl = {"MX_HEARTBEAT_INTERVAL": "5", "MX_SOURCE_TTL": "30"}
    a1 = replicas("a1", extra_env=long_ttl)
    a2 = replicas("a2", extra_env=long_ttl)
    a1.engine_results()
    a2.engine_results()
    a1.wait_serving()
    a2.wait_serving()
    ids = {re.search(r"published (\S+) as a source", "\n".join(r.sidecar.lines)).group(1): r  # type: ignore
           for r in (a1, a2)}
    r = redis.Redis.from_url(redis_server.url)
    fp = _record(r.get(next(iter(r.scan_iter("mx:*:src:*"))))).fingerprint
    a2_id = next(i for i, rep in ids.items() if rep is a2)
    r.set(f"mx:{fp}:readers:{a2_id}", 5)  # busier: the target tries the wedged a1 first
    a1.sidecar.signal(signal.SIGSTOP)
    try:
        # The target's own metadata lives MX_SOURCE_TTL=3 s; the first source stalls it for 6 s.
        b = replicas("b", sidecar_timeout=30, extra_env={"MX_STALL_TIMEOUT": "6", "MX_SOURCE_TTL": "3",
                                                         "MX_HEARTBEAT_INTERVAL": "1"})
        res_b = b.engine_results(timeout=60)
        assert [res_b[x]["outcome"] for x in (0, 1)] == ["received", "received"], "not storage"
        a1_id = next(i for i, rep in ids.items() if rep is a1)
        stalled = b.sidecar.wait_for(r"source failed: no Welcome from the source within 6s", 5)
        assert f"peer={a1_id}" in stalled.string
        served = b.sidecar.wait_for(r"phase=receive .* every checksum verified", 5)
        assert f"peer={a2_id}" in served.string
    finally:
        a1.sidecar.signal(signal.SIGCONT)


def test_a_withdrawing_source_tells_its_reader_which_moves_on_at_once(replicas):
    a = replicas("a")
    res_a = a.engine_results()
    a.wait_serving()
    # Slow READs (a failpoint) keep b mid-transfer; a long stall timeout shows that b does not wait one out.
    b = replicas("b", extra_env={"MX_STALL_TIMEOUT": "60", "MX_TEST_FAILPOINTS": "before_read=sleep:0.3",
                                 "MX_STAGING_SLOT_BYTES": "64KiB"})  # many chunks: seconds of transfer
    b.sidecar.wait_for(r"failpoint before_read", 30)  # Welcomed, READs under way (not only "pulling": a Hello
    # that arrives after the withdrawal is refused instead, tested below)
    a.engine.signal(signal.SIGUSR1)  # an in-place weight update: a withdraws at its next ping
    withdrew = a.sidecar.wait_for(r"withdrawing as a source", 10)
    t0 = time.monotonic()
    b.sidecar.wait_for(r"source failed: the source withdrew from this session \(Bye\)", 10)
    assert time.monotonic() - t0 < 5, "within a second or two, not MX_STALL_TIMEOUT"
    res_b = b.engine_results(timeout=60)
    assert res_b[0]["outcome"] == "loaded" and res_b[0]["digests"] == res_a[0]["digests"]  # storage, unchanged
    assert withdrew


def test_a_hello_that_reaches_a_source_after_it_withdrew_is_refused_at_once_not_left_to_stall(replicas):
    a = replicas("a")
    res_a = a.engine_results()
    a.wait_serving()
    # b picks a, then prepares for 3 s; meanwhile a withdraws (in-place weight update), so b's Hello comes late.
    b = replicas("b", engine_args=["--prepare-delay", "3"], extra_env={"MX_STALL_TIMEOUT": "60"})
    # Once b holds a's agent metadata (set up ahead of its engine): a withdrawal before that deletes it and b
    # refuses before any Hello (measured under CI load: storage without the path this test is about).
    b.sidecar.wait_for(r"phase=preconnect .*peers loaded and connected", 30)
    a.engine.signal(signal.SIGUSR1)
    a.sidecar.wait_for(r"withdrawing as a source", 10)
    b.sidecar.wait_for(r"pulling .* from", 30)
    t0 = time.monotonic()
    b.sidecar.wait_for(r"source failed: source refused: this replica no longer serves rank \d \(withdrawn\)", 10)
    assert time.monotonic() - t0 < 5, "a signed refusal, not MX_STALL_TIMEOUT of silence"
    res_b = b.engine_results(timeout=60)
    assert res_b[0]["outcome"] == "loaded" and res_b[0]["digests"] == res_a[0]["digests"]
