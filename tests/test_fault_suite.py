"""The fault suite, quick profile (`make chaos` runs the same scenarios hundreds of times, randomized).

Every scenario asserts the end state: the target engine holds the checkpoint's bytes or stays blocked, never
anything else, and no source publishes other bytes."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import SCENARIOS
from tests.faults import Lab, stampede

pytestmark = pytest.mark.fault


@pytest.fixture
def lab(redis_server, checkpoint: Path, tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(redis_server, checkpoint, tmp_path)
    yield lab
    lab.close()


EXPECTED = {  # what may happen, besides "never wrong"
    "slow_prepare": {"received"},
    "prepare_moves_tensors": {"received"},
    "source_dies_in_prepare": {"fell_back"},
    "weights_changed": {"fell_back"},
    "target_killed": {"received", "fell_back"},
    "fence_unconfirmed": {"received", "fell_back"},
    "seeder_killed": {"fell_back"},
    "engine_restart_serving": {"fell_back"},  # the new engine loads (it seeds again), then a target receives
    "sidecar_restart_loading": {"fell_back"},
    "direct_reader_killed": {"received"},
    "late_joiner": {"received"},
    "two_sources_burst": {"received"},
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fault_scenario_ends_on_the_checkpoints_bytes_or_blocked(lab: Lab, name: str) -> None:
    seed = int(os.environ.get("MX_FAULT_SEED", "0")) or random.randrange(1 << 30)
    out = SCENARIOS[name](lab, random.Random(seed))
    assert not out.wrong, f"{out} (seed {seed})"
    assert out.outcome in EXPECTED.get(name, {"received", "fell_back"}), f"{out} (seed {seed})"
    assert not out.note.startswith("expected"), f"{out} (seed {seed})"


def test_fault_eight_replicas_at_once_read_storage_once(lab: Lab) -> None:
    out = stampede(lab, random.Random(0), int(os.environ.get("MX_STAMPEDE", "4")))
    assert not out.wrong and out.note == "1 storage reads", out


def test_fault_a_dead_background_task_fails_healthz_and_the_process_exits_non_zero(lab: Lab) -> None:
    a = lab.start("a", {"MX_TEST_FAILPOINTS": "task.keepalive=raise@4,shutdown=sleep:3"})
    a.engine_results(60)
    a.sidecar.wait_for(r"background task keepalive died", 30)  # type: ignore[union-attr]
    status, _ = a.http("/healthz")
    assert status == 503
    _, text = a.http("/metrics")
    assert 'mx_background_task_failures_total{model="toy-llama",task="keepalive"} 1.0' in text
    assert a.sidecar.p.wait(15) == 5  # type: ignore[union-attr]


def test_fault_a_dead_nixl_pump_is_fatal_too(lab: Lab) -> None:
    a = lab.start("a", {"MX_TEST_FAILPOINTS": "task.nixl_pump=raise@50"})
    a.sidecar.wait_for(r"background task nixl_pump died", 30)  # type: ignore[union-attr]
    assert a.sidecar.p.wait(15) == 5  # type: ignore[union-attr]
    a.sidecar.signal(signal.SIGTERM)  # type: ignore[union-attr]
