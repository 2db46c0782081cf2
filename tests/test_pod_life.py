"""The pod's own life through real processes: the engine container restarts (or dies for a while) under a running
sidecar. The sidecar withdraws, drops the old engine's memory and runs the replica's life again for the new engine,
in the same process (no exit, no crash-loop back-off)."""

from __future__ import annotations

import os
import signal
import sys
import time

import zmq

from sidecar.lab.fallback_memory import measure
from sidecar.lab.replica_procs import Proc
from tests.faults import FAST_ENV
from tests.test_end_to_end import _metric, _sources

SERVING = r"serving as a source"


def test_an_engine_restarted_under_a_serving_sidecar_ends_served_and_published_again(replicas, redis_server):
    a = replicas("a")
    res_a = a.engine_results()
    a.wait_serving()
    sidecar_pid = a.sidecar.p.pid
    mark = len(a.sidecar.lines)
    a.restart_engine()  # SIGKILL, then a new engine process on the same sockets
    a.sidecar.wait_for(r"the engine restarted \(incarnation .*life starts over", 30, after=mark)
    res_new = a.engine_results(timeout=60)
    # The new engine got a verdict from the sidecar (not its own timeout) and holds the checkpoint's bytes.
    assert [res_new[r]["outcome"] for r in (0, 1)] == ["loaded", "loaded"]
    assert all(res_new[r]["digests"] == res_a[r]["digests"] for r in (0, 1))
    a.sidecar.wait_for(SERVING, 30, after=mark)
    assert a.sidecar.p.poll() is None and a.sidecar.p.pid == sidecar_pid, "the same sidecar process serves on"
    assert len(_sources(redis_server.url)) == 1, "one record: the old life's was withdrawn"
    _, text = a.http("/metrics")
    assert _metric(text, "mx_engine_restarts_total", reason="restarted") == 1
    b = replicas("b")  # reads the new engine's memory through the new record
    res_b = b.engine_results()
    assert [res_b[r]["outcome"] for r in (0, 1)] == ["received", "received"]
    assert all(res_b[r]["digests"] == res_a[r]["digests"] for r in (0, 1))


def test_an_engine_that_dies_and_comes_back_later_is_waited_for_and_served(replicas):
    a = replicas("a", extra_env={"MX_REQUEST_TIMEOUT": "1"})
    res_a = a.engine_results()
    a.wait_serving()
    mark = len(a.sidecar.lines)
    a.kill_engine()
    a.sidecar.wait_for(r"engine is gone; withdrawn .* life starts over", 30, after=mark)
    a.sidecar.wait_for(r"waiting for engine rank 0", 10, after=mark)
    assert a.sidecar.p.poll() is None, "waits for the next engine instead of exiting"
    a.start_engine()
    res_new = a.engine_results(timeout=60)
    assert [res_new[r]["outcome"] for r in (0, 1)] == ["loaded", "loaded"]
    assert res_new[0]["digests"] == res_a[0]["digests"]
    a.sidecar.wait_for(SERVING, 30, after=mark)
    _, text = a.http("/metrics")
    assert _metric(text, "mx_engine_restarts_total", reason="gone") == 1


def test_an_engine_restarted_mid_receive_ends_on_the_checkpoints_bytes_never_the_old_attempts(replicas):
    a = replicas("a")
    res_a = a.engine_results()
    a.wait_serving()
    b = replicas("b", extra_env={"MX_TEST_FAILPOINTS": "before_read=sleep:0.05", "MX_STAGING_SLOT_BYTES": "64KiB"})
    b.sidecar.wait_for(r"pulling .* from", 30)
    mark = len(b.sidecar.lines)
    b.restart_engine()
    b.sidecar.wait_for(r"the engine restarted .*life starts over", 30, after=mark)
    res_b = b.engine_results(timeout=90)
    assert {res_b[r]["outcome"] for r in (0, 1)} <= {"received", "loaded"}
    assert all(res_b[r]["digests"] == res_a[r]["digests"] for r in (0, 1))
    b.sidecar.wait_for(SERVING, 60, after=mark)
    assert b.sidecar.p.poll() is None


def test_a_failed_receive_is_unmapped_before_the_storage_load_so_the_fallback_peaks_at_one_model(
        redis_server, checkpoint, work):
    # The same measurement as `make bench` (docs/benchmarks/cpu-fallback-memory.json) on the small test model.
    after = measure(checkpoint, redis_server.url, work, "released", keep_mapped=False, hold_s=0.5)
    assert after["peak_over_model"] < 1.4, after
    before = measure(checkpoint, redis_server.url, work, "kept", keep_mapped=True, hold_s=0.5)  # the old behaviour
    assert before["peak_over_model"] > 1.7, before  # the measurement tells the two apart


def test_a_direct_reader_that_dies_mid_read_frees_its_source_slot_within_two_metadata_ttls(replicas):
    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    b = replicas("b", extra_env={"MX_TEST_FAILPOINTS": "before_read=sleep:0.3", "MX_STAGING_SLOT_BYTES": "64KiB"})
    b.sidecar.wait_for(r"failpoint before_read", 30)  # Welcomed: READs under way
    b.sidecar.signal(signal.SIGKILL)  # no Bye: before, the session held one of 64 slots for MX_TRANSFER_TIMEOUT
    t0 = time.monotonic()
    a.sidecar.wait_for(r"reader \S+ no longer refreshes its metadata .*; session dropped", 20)
    assert time.monotonic() - t0 < 2 * 3 + 3  # MX_SOURCE_TTL=3 in the tests: expiry, then one check
    _, text = a.http("/metrics")
    assert _metric(text, "mx_serve_sessions_total", result="reader_gone") >= 1
    c = replicas("c")  # the source serves on
    assert c.engine_results()[0]["outcome"] == "received"


def test_with_mx_log_format_json_every_line_of_a_target_parses_and_carries_the_text_lines_fields(replicas):
    import json

    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    b = replicas("b", extra_env={"MX_LOG_FORMAT": "json"})
    assert b.engine_results()[0]["outcome"] == "received"
    b.sidecar.wait_for(r'"msg": "serving as a source', 30)
    docs = [json.loads(line) for line in b.sidecar.lines]  # every line, NIXL's own logger's included
    assert any(d["logger"].startswith("nixl") for d in docs)
    assert len(docs) > 10 and all({"ts", "level", "logger", "msg"} <= d.keys() for d in docs)
    phases = {d["phase"]: d for d in docs if "phase" in d}
    assert {"connect", "role", "transfer", "verify", "release"} <= phases.keys()
    assert phases["transfer"]["role"] == "target" and phases["transfer"]["rank"] in (0, 1)
    assert isinstance(phases["release"]["phase_s"], float) and phases["release"]["model"] == "toy-llama"
    assert not any(d["msg"].startswith("[") for d in docs), "the prefix became fields"


def test_a_sidecar_stopped_before_its_engine_ever_answered_sends_it_no_abort_and_exits_cleanly(redis_server, work):
    """Measured before: every such stop (a pod deleted while its engine still loads, each compile cache's own sidecar)
    sent `abort` to the silent socket and waited 2 s for an answer that could not come."""
    ctx = zmq.Context()
    hook = ctx.socket(zmq.ROUTER)  # where the engine's rank 0 will be: it reads, it never answers
    hook.bind(f"ipc://{work}/silent-0.sock")
    env = {**os.environ, **FAST_ENV, "MX_ZMQ_ADDRESS": f"ipc://{work}/silent.sock", "MX_REDIS_URL": redis_server.url,
           "MX_METRICS_PORT": "0", "MX_METRICS_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    p = Proc("silent-sidecar", [sys.executable, "-m", "sidecar", "run"], env, work)
    try:
        assert hook.poll(30_000), "the sidecar never pinged"
        heard = [hook.recv_multipart()[-1]]
        p.signal(signal.SIGTERM)
        assert p.p.wait(15) == 0, "\n".join(p.lines[-20:])
        while hook.poll(200):
            heard.append(hook.recv_multipart()[-1])
        assert all(b"ping" in m for m in heard), heard
        assert not [m for m in heard if b"abort" in m]
        p.wait_for(r"stopped$", 5)
    finally:
        p.stop()
        hook.close(0)
        ctx.term()
