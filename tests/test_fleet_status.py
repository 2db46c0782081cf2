"""`mx-sidecar status` against a real Redis with running replicas (real processes, real NIXL), as an operator runs
it: `python -m sidecar status [--model M] [--json] [--watch S]`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import redis

SLOW_BEATS = {"MX_SOURCE_TTL": "30", "MX_HEARTBEAT_INTERVAL": "5"}


def _status(url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MX_REDIS_URL": url, "MX_LOG_LEVEL": "warning"}
    return subprocess.run([sys.executable, "-m", "sidecar", "status", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _fleet(url: str, *args: str) -> dict[str, Any]:
    res = _status(url, "--json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _models(fleet: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["model"]: m for m in fleet["models"]}


def _replica_id(rep) -> str:  # type: ignore[no-untyped-def]
    return re.search(r"published (\S+) as a source", "\n".join(rep.sidecar.lines)).group(1)  # type: ignore[union-attr]


def test_status_lists_each_models_live_sources_with_node_ranks_mode_readers_age_and_heartbeat(replicas,
                                                                                              redis_server):
    a = replicas("a")
    c = replicas("c", model_id="other-model", extra_env={"MX_SOURCE_MODE": "staged", "MX_STAGING_SLOT_BYTES": "1MiB"})
    a.wait_serving()
    b = replicas("b")
    assert b.engine_results()[0]["outcome"] == "received"
    b.wait_serving()
    c.wait_serving()
    models = _models(_fleet(redis_server.url))
    assert set(models) == {"toy-llama", "other-model"}
    toy = models["toy-llama"]
    assert {s["replica"] for s in toy["sources"]} == {_replica_id(a), _replica_id(b)}
    assert len(toy["fingerprints"]) == 1 and toy["targets_in_flight"] == 0 and toy["leases"] == []
    for s in toy["sources"] + models["other-model"]["sources"]:
        assert s["ranks"] == 2 and s["live"] is True and s["readers"] == 0
        assert s["node"] and 0 < s["age_s"] < 120 and 0 <= s["heartbeat_s"] < 3
        assert s["authenticated"] == "NO KEY"  # these replicas run without MX_AUTH_KEY_FILE
    assert [s["mode"] for s in toy["sources"]] == ["direct", "direct"]
    assert [s["mode"] for s in models["other-model"]["sources"]] == ["staged"]
    only = _models(_fleet(redis_server.url, "--model", "other-model"))
    assert set(only) == {"other-model"}
    text = _status(redis_server.url).stdout
    assert "toy-llama: 2 live sources, 0 seeding, 0 targets in flight" in text
    for col in ("REPLICA", "NODE", "FINGERPRINT", "RANKS", "MODE", "READERS", "AGE", "HEARTBEAT", "AUTH"):
        assert col in text
    assert _replica_id(c) in text and toy["fingerprints"][0][:12] in text


def test_status_shows_the_seeding_lease_while_the_first_replica_loads_then_the_target_in_flight(replicas,
                                                                                                redis_server):
    s = replicas("s", extra_env=SLOW_BEATS, engine_args=["--load-delay", "6"])
    s.sidecar.wait_for(r"phase=role .*: seed", 30)
    leases = [le for m in _fleet(redis_server.url)["models"] for le in m["leases"]]
    assert len(leases) == 1 and leases[0]["model"] == "" and 0 < leases[0]["expires_in_s"] <= 3
    assert re.fullmatch(rf".+-{s.sidecar.p.pid}-[0-9a-f]{{6}}", leases[0]["holder"]), "the seeder's replica id"
    s.wait_serving(60)
    assert _models(_fleet(redis_server.url))["toy-llama"]["leases"] == [], "released once published"
    # A frozen source: the target has counted itself as a reader and waits for the source's answer.
    s.sidecar.signal(signal.SIGSTOP)
    try:
        t = replicas("t", extra_env={"MX_STALL_TIMEOUT": "15"})
        t.sidecar.wait_for(r"pulling .* from", 30)
        toy = _models(_fleet(redis_server.url))["toy-llama"]
        assert toy["targets_in_flight"] == 1
        assert [(x["replica"], x["readers"]) for x in toy["sources"]] == [(_replica_id(s), 1)]
        assert "1 target in flight" in _status(redis_server.url).stdout
    finally:
        s.sidecar.signal(signal.SIGCONT)
    assert t.engine_results(timeout=60)[0]["outcome"] in ("received", "loaded")
    t.wait_serving(30)
    deadline = time.monotonic() + 10
    while _models(_fleet(redis_server.url))["toy-llama"]["targets_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _models(_fleet(redis_server.url))["toy-llama"]["targets_in_flight"] == 0


def test_status_watch_redraws_until_interrupted_and_reports_unreadable_records(replicas, redis_server):
    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    r = redis.Redis.from_url(redis_server.url)
    r.set("mx:" + "e" * 64 + ":src:garbage-1-000000", b"\xc1 not msgpack")
    env = {**os.environ, "MX_REDIS_URL": redis_server.url, "MX_LOG_LEVEL": "warning"}
    p = subprocess.Popen([sys.executable, "-m", "sidecar", "status", "--json", "--watch", "0.3"], env=env,
                         stdout=subprocess.PIPE, text=True)
    try:
        frames = [json.loads(p.stdout.readline()) for _ in range(3)]  # type: ignore[union-attr]
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(10)
    assert rc == 0
    assert frames[0]["taken_at"] < frames[1]["taken_at"] < frames[2]["taken_at"]
    assert all(len(f["models"]) == 1 and f["models"][0]["sources"][0]["live"] for f in frames)
    assert any("garbage-1-000000" in u and "malformed" in u for u in frames[-1]["unreadable"])
    text = _status(redis_server.url).stdout
    assert "toy-llama: 1 live source," in text and "unreadable:" in text


def test_status_says_clearly_when_redis_cannot_be_reached(tmp_path):
    res = _status(f"unix://{tmp_path}/nothing.sock")
    assert res.returncode == 1 and "cannot read unix://" in res.stderr and "Traceback" not in res.stderr



def test_a_replica_that_matches_no_source_of_its_model_logs_why_and_status_explain_names_the_fields(replicas,
                                                                                                   redis_server,
                                                                                                   other_checkpoint):
    a = replicas("a")
    a.wait_serving()
    c = replicas("c", checkpoint=other_checkpoint, revision="r2")  # float32, and another revision
    assert c.engine_results()[0]["outcome"] == "loaded"
    line = c.sidecar.wait_for(r"serves toy-llama under fingerprint \w+, not ours .*", 10).group(0)
    assert "dtype: float32 != bfloat16" in line and "revision: r2 != r1" in line and "layout:" in line
    c.wait_serving()
    toy = _models(_fleet(redis_server.url, "--explain"))["toy-llama"]
    assert len(toy["fingerprints"]) == 2
    [(fp, diffs)] = toy["differences"].items()
    fields = sorted(d.split(":")[0] for d in diffs)
    assert fields == ["dtype", "layout", "revision"], diffs
    text = _status(redis_server.url, "--explain").stdout
    assert f"{fp[:12]} differs from" in text and "in 3 fields:" in text
    assert re.search(r"^    revision: r\d != r\d$", text, re.M), text
    assert "differs from" not in _status(redis_server.url).stdout, "only with --explain"
