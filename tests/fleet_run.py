"""A small fleet of real replicas, scraped by a real Prometheus, in which every alert has a reason to fire.

Shared by tests/test_monitoring.py and tests/dashboard_png.py. Each replica is a toy engine process plus a
`python -m sidecar run` process (sidecar/lab/replica_procs.py), all on one real Redis (valkey):

  toy-a  a: loads from storage and serves;  b: receives from a over NIXL          (transfers, throughput)
  toy-b  d: serves, then its sidecar is SIGKILLed;  e: tries d, falls back to storage   (MxFellBackToStorage)
  toy-c  f: its Redis is unreachable: loads alone, never published    (MxRedisErrors, MxNoLiveSource)
  toy-d  g: serves with deployment key A;  h: has key B, refuses g's record, loads from storage   (MxAuthFailures)
  toy-a/b/c run without a key                                          (MxUnauthenticatedRecords)

The two threshold records are lowered (THRESHOLDS) so that MxSlowLink and MxTimeToReadySLO fire on a 2-core CPU
run; the alert expressions themselves are the shipped ones.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.lab.embedded_redis import EmbeddedRedis
from sidecar.lab.replica_procs import Replica
from sidecar.lab.toy_engine import SMALL, make_checkpoint
from tests.prom import Prometheus, rule_groups
from tests.tooling import tool

# What the run makes Prometheus raise (the live tests check each, with the model that caused it).
EXPECTED_ALERTS = {"MxFellBackToStorage", "MxNoLiveSource", "MxSlowLink", "MxRedisErrors", "MxTimeToReadySLO",
                   "MxUnauthenticatedRecords", "MxAuthFailures"}
THRESHOLDS = {"mx:slo_time_to_ready_seconds": "vector(0.001)", "mx:slow_link_bytes_per_second": "vector(1e15)"}
FAST_ENV = {"MX_HEARTBEAT_INTERVAL": "0.5", "MX_SOURCE_TTL": "3", "MX_SEED_LEASE_TTL": "3", "MX_POLL_INTERVAL": "0.1",
            "MX_STALL_TIMEOUT": "5", "MX_LOG_LEVEL": "info"}


@dataclass
class FleetRun:
    prom: Prometheus
    redis: EmbeddedRedis
    replicas: dict[str, Replica] = field(default_factory=dict)
    t_start: float = 0.0
    t_end: float = 0.0

    def start(self, name: str, model: str, work: Path, ckpt: Path, **env: str) -> Replica:
        rep = Replica(name, ckpt, self.redis.url, work, tp=1, model_id=model, extra_env={**FAST_ENV, **env})
        self.replicas[name] = rep
        return rep

    def scrape(self, rep: Replica) -> None:
        self.prom.add_target(rep.metrics_port, rep.name)

    def settle(self, timeout: float = 45.0) -> None:
        """Until Prometheus has scraped the final states and its rules raised what they should (a loaded 2-core
        machine delays scrapes and rule evaluations by seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            held = {a["labels"]["alertname"] for a in self.prom.alerts()}
            if held >= EXPECTED_ALERTS:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"alerts raised: {sorted(held)}; expected {sorted(EXPECTED_ALERTS)}")
            time.sleep(0.5)


@contextlib.contextmanager
def fleet(work: Path, hold_s: float = 2.0) -> Iterator[FleetRun]:
    """Run the scenario; yields once every replica reached its final state and Prometheus saw it for `hold_s`."""
    ckpt = work / "ckpt"
    make_checkpoint(ckpt, SMALL)
    redis = EmbeddedRedis().start()
    prom = Prometheus(tool("prometheus"), work / "prom", rule_groups(THRESHOLDS))
    run = FleetRun(prom, redis, t_start=time.time())
    keys = {}
    for name in ("A", "B"):
        keys[name] = work / f"key-{name}"
        keys[name].write_text(name * 48)
        keys[name].chmod(0o600)
    try:
        a = run.start("a", "toy-a", work, ckpt)
        d = run.start("d", "toy-b", work, ckpt, MX_SOURCE_TTL="30", MX_HEARTBEAT_INTERVAL="5")
        f = run.start("f", "toy-c", work, ckpt, MX_REDIS_URL=f"unix://{work}/no-redis-here.sock")
        g = run.start("g", "toy-d", work, ckpt, MX_AUTH_KEY_FILE=str(keys["A"]))
        for rep in (a, d, f, g):
            run.scrape(rep)
        a.wait_serving()
        d.wait_serving()
        g.wait_serving()
        h = run.start("h", "toy-d", work, ckpt, MX_AUTH_KEY_FILE=str(keys["B"]))
        run.scrape(h)
        f.sidecar.wait_for(r"Redis unavailable", 60)  # type: ignore[union-attr]
        time.sleep(1.5)  # one scrape of d as a live source before it dies
        d.sidecar.signal(signal.SIGKILL)  # type: ignore[union-attr]
        d.sidecar.p.wait(5)  # type: ignore[union-attr]
        b = run.start("b", "toy-a", work, ckpt)
        e = run.start("e", "toy-b", work, ckpt, MX_STALL_TIMEOUT="3")
        for rep in (b, e):
            run.scrape(rep)
        b.wait_serving()
        e.sidecar.wait_for(r"no source delivered; falling back to storage", 60)  # type: ignore[union-attr]
        e.wait_serving()
        f.engine_results()
        h.wait_serving()
        run.settle()
        time.sleep(hold_s)
        run.t_end = time.time()
        yield run
    finally:
        for rep in run.replicas.values():  # all at once: each withdraws and exits in parallel
            if rep.sidecar is not None:
                rep.sidecar.signal(signal.SIGTERM)
            rep.engine.signal(signal.SIGTERM)
        for rep in run.replicas.values():
            rep.stop()
        prom.stop()
        redis.stop()
