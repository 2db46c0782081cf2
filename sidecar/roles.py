"""Decide a replica's role from Redis: target of live sources, seeder (holds the lease), or storage."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal

from sidecar.config import Config
from sidecar.coordinator import Candidate, Coordinator
from sidecar.errors import CoordinatorUnavailable
from sidecar.logs import Ctx
from sidecar.metrics import Metrics

Decision = Literal["target", "seed", "seed_wait_timeout", "redis_down"]


@dataclass
class Role:
    decision: Decision
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def holds_lease(self) -> bool:
        return self.decision == "seed"


async def decide(cfg: Config, coord: Coordinator, fp: str, model: str, metrics: Metrics, log: Ctx) -> Role:
    """'target' with candidates, 'seed' (holds the lease), or a storage load without the lease."""
    t0 = time.monotonic()
    deadline = t0 + cfg.seed_wait_timeout
    next_note = t0

    def decided(role: Role) -> Role:
        metrics.decisions.labels(model, role.decision).inc()
        log.info("phase=role %.2fs: %s (%d live sources)", time.monotonic() - t0, role.decision,
                 len(role.candidates))
        return role

    try:
        while True:
            cands = await coord.live_sources(fp)
            metrics.sources_visible.labels(model).set(len(cands))
            if cands:
                return decided(Role("target", cands))
            if await coord.try_seed(fp, cfg.seed_lease_ttl):
                return decided(Role("seed"))
            now = time.monotonic()
            if now >= deadline:
                log.warning("seeder did not publish within %.0fs; loading from storage", cfg.seed_wait_timeout)
                return decided(Role("seed_wait_timeout"))
            if now >= next_note:
                log.info("waiting for seeder %s to publish", await coord.seeder(fp))
                next_note = now + 10
            await asyncio.sleep(cfg.poll_interval)
    except CoordinatorUnavailable as e:
        metrics.redis_errors.labels(model, "decide").inc()
        log.warning("Redis unavailable (%s): loading from storage without coordination", e)
        return decided(Role("redis_down"))


async def renew_lease(cfg: Config, coord: Coordinator, fp: str, model: str, metrics: Metrics, log: Ctx) -> None:
    """While seeding: keep the lease (a lost lease means another replica may seed too: slower, not wrong)."""
    while True:
        await asyncio.sleep(cfg.seed_lease_ttl / 3)
        try:
            if not await coord.renew_seed(fp, cfg.seed_lease_ttl):
                log.warning("seeding lease lost (expired while loading); another replica may seed too")
        except CoordinatorUnavailable as e:
            metrics.redis_errors.labels(model, "renew").inc()
            log.warning("cannot renew the seeding lease: %s", e)
