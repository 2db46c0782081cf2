"""A burst of targets on one source, through real processes (sidecar/lab/fanout.py; `make bench` runs more sizes)."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from sidecar.lab.fanout import STAGED, burst
from tests.faults import SLOW_TRANSFER


@pytest.mark.parametrize("mode", ["staged", "direct"])
def test_four_targets_started_at_once_are_all_ready_within_twice_one_alone_with_one_storage_read(
        mode: str, redis_server, checkpoint: Path, tmp_path: Path) -> None:
    one = burst(tmp_path, redis_server.url, checkpoint, 1, mode, "carousel", read_delay=0.03)
    four = burst(tmp_path, redis_server.url, checkpoint, 4, mode, "carousel", read_delay=0.03)
    for b in (one, four):
        assert b.identical and b.outcomes == ["received"] * b.targets and b.storage_reads == 1, b
    # Before the carousel a staged source served one reader at a time: 4 targets took ~4x one (bench: star rows).
    assert four.all_ready_s <= 2 * one.all_ready_s, (one, four)


def test_a_reader_stopped_mid_pass_is_dropped_after_its_bound_and_then_receives_from_a_finished_target(
        replicas) -> None:
    env = {**STAGED, **SLOW_TRANSFER, "MX_STRAGGLER_TIMEOUT": "2", "MX_STALL_TIMEOUT": "20"}
    a = replicas("a", extra_env=env)
    ref = a.engine_results()
    a.wait_serving()
    readers = [replicas(f"r{i}", extra_env=env) for i in range(3)]
    for r in readers:
        r.sidecar.wait_for(r"joined the source's pass at chunk", 60)
    stuck, others = readers[0], readers[1:]
    stuck.sidecar.signal(signal.SIGSTOP)  # its Done notifications stop: it holds a slot of the pass
    t0 = time.monotonic()
    try:
        for r in others:
            res = r.engine_results(60)
            assert [res[k]["digests"] for k in res] == [ref[k]["digests"] for k in ref]
        held = time.monotonic() - t0
        a.sidecar.wait_for(r"dropped 1 reader\(s\) that held \d+ others back", 5)
    finally:
        stuck.sidecar.signal(signal.SIGCONT)
    # the others waited for the bound (2 s) plus their own transfer (~1 s), not for the stall timeout (20 s)
    assert held < 2 + 8, held
    res = stuck.engine_results(60)  # told it was dropped (signed Bye): the next source, a finished target, serves it
    assert all(res[k]["outcome"] == "received" and res[k]["digests"] == ref[k]["digests"] for k in res)
    assert any(re.search(r"source withdrew from this session", line) for line in stuck.sidecar.lines)
    _, text = a.http("/metrics")
    assert 'mx_serve_sessions_total{model="toy-llama",result="straggler"}' in text
