"""Source: publish what the engine holds, keep the record alive, and stay true to the engine.

A source re-checks its engine at every keepalive ping (sidecar.source.watch). Before, the keepalive ignored
it, and a source kept advertising memory its engine had rebuilt or rewritten. Any change withdraws the
source at once; it publishes again only after a fresh import and fresh checksums, and never after an
in-place weight update (those bytes are no longer the checkpoint's that the fingerprint names).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Literal

from sidecar.agents import Agents
from sidecar.config import Config
from sidecar.contract.codec import PROTOCOL_VERSION
from sidecar.contract.messages import Manifest, RankSource, Reply, SourceRecord
from sidecar.coordinator import Coordinator
from sidecar.engine import EngineRanks
from sidecar.errors import CoordinatorUnavailable
from sidecar.failpoints import Failpoints
from sidecar.logs import Ctx
from sidecar.memory.rank_memory import RankMemory
from sidecar.metrics import Metrics
from sidecar.source.mode_probe import ModeChooser
from sidecar.source.ring import Carousel, StagingRing
from sidecar.source.server import SourceServer
from sidecar.source.watch import EngineWatch


@dataclass
class Publisher:
    cfg: Config
    replica_id: str
    coord: Coordinator
    agents: Agents
    engine: EngineRanks
    server: SourceServer
    metrics: Metrics
    log: Ctx
    failpoints: Failpoints
    _ranks: dict[int, RankMemory] = field(default_factory=dict)
    published: bool = False
    withdrawn: str = ""  # why we stopped serving ('' while serving or before the first publication)
    _watched: EngineWatch = field(default_factory=EngineWatch)
    _record: SourceRecord | None = None
    _modes: ModeChooser = field(init=False)
    _withdrawing: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self._modes = ModeChooser(self.cfg.source_mode)

    @property
    def ranks(self) -> dict[int, RankMemory]:
        """The ranks this source serves (or will): read-only from outside; see adopt."""
        return self._ranks

    def adopt(self, ranks: dict[int, RankMemory]) -> None:
        """Take ranks imported elsewhere (a target's, before it becomes a source) as this source's."""
        self._ranks = ranks

    def release(self) -> int:
        """Deregister and unmap the engine memory of a failed attempt (no READ may be in flight); its bytes. Before
        a fallback storage load: vLLM rebuilds the model there, and our mapping kept the old one alive beside the
        new (about twice the model in /dev/shm on CPU, measured in docs/benchmarks/cpu-fallback-memory.json)."""
        nbytes = sum(r.nbytes for rm in self._ranks.values() for r in rm.regions)
        for rm in self._ranks.values():
            rm.close()
        self._ranks = {}
        self.metrics.registered_bytes.labels(self.engine.model, "engine").set(0)
        return nbytes

    async def become_source(self, manifests: list[Manifest], verified: bool) -> None:
        """Import (if the layout changed), stage, checksum (unless just verified against a source), publish."""
        t0 = time.monotonic()
        model = self.engine.model
        replies = await self.engine.states()  # the engine's state now, not what an earlier reply said
        current = [r.manifest for r in replies if r.manifest is not None]
        if any(r.state != "ready" for r in replies):
            raise RuntimeError(f"cannot publish: ranks are {[r.state for r in replies]}")
        if not self._ranks or any(self._ranks[m.tp_rank].manifest != m for m in current):
            self._ranks = await self.agents.import_ranks(current, self.ranks, model, self.metrics, self.log)
            verified = verified and all(m == c for m, c in zip(manifests, current, strict=True))
        for rm in self.ranks.values():
            await self._stage(rm)
        if not verified:
            t1 = time.monotonic()
            sums = await asyncio.gather(*(rm.compute_checksums() for rm in self.ranks.values()))
            for rm, s in zip(self.ranks.values(), sums, strict=True):
                rm.checksums = s
            self.log.info("phase=checksum %.2fs over %d tensors", time.monotonic() - t1, sum(len(s) for s in sums))
        self._watched.take(replies)
        derived = {r.manifest.tp_rank: r.derived for r in replies if r.manifest is not None}
        self._record = SourceRecord(PROTOCOL_VERSION, self.replica_id, self.cfg.node_name, model, self.engine.fp, [
            RankSource(rm.rank, rm.transport.name if rm.transport else "", rm.mem_type, rm.device_id, self._mode(rm),
                       list(rm.manifest.tensors), list(rm.checksums),
                       slots=[(s.addr, s.nbytes) for s in rm.ring.slots] if rm.ring else [],
                       entry_addrs=list(rm.entry_addrs) if self._mode(rm) == "direct" else [],
                       derived=dict(derived.get(rm.rank, {})))
            for rm in self.ranks.values()], published_at=time.time(),
            identity=dict(self._ranks[min(self._ranks)].manifest.identity) if self._ranks else {},
            topology=self.cfg.topology)
        self.server.serve(self.ranks)
        self.withdrawn = ""
        if self._watch not in self.engine.observers:
            self.engine.observers.append(self._watch)
        try:
            await self.failpoints.ahit("before_publish")  # tests: a publish that outlasts the seeding lease
            await self.agents.put_all(self.coord)
            await self.coord.publish(self._record, self.agents.names())
            self.published = True
            self.metrics.source_published.labels(model).set(1)
        except CoordinatorUnavailable as e:
            self.metrics.redis_errors.labels(model, "publish").inc()
            self.log.warning("cannot publish yet (Redis unavailable: %s); the heartbeat retries", e)
        self.metrics.set_role(model, "serving")
        self.log.set(role="serving")
        self.log.info("phase=publish %.2fs", time.monotonic() - t0)

    async def _stage(self, rm: RankMemory) -> None:
        if self._mode(rm) != "staged" or rm.ring is not None or rm.transport is None:
            return
        reg = rm.add_ring(StagingRing(rm.ops, self.cfg.staging_slots, self.cfg.staging_slot_bytes))
        await self._modes.probe(rm, f"{self.replica_id}-probe{rm.device_id}", self.log)
        if self._mode(rm) == "staged":
            assert rm.ring is not None
            rm.ring.carousel = Carousel(rm.ring, rm.rank, list(rm.manifest.tensors), rm.entry_addrs,
                                        max_readers=self.cfg.fanout_readers, stall_timeout=self.cfg.stall_timeout,
                                        straggler_timeout=min(self.cfg.straggler_timeout, self.cfg.stall_timeout))
            self.metrics.registered_bytes.labels(self.engine.model, "staging").inc(rm.ring.nbytes)
            rm.unregister_engine()
            self.metrics.registered_bytes.labels(self.engine.model, "engine").set(0)
        else:
            rm.drop_ring(reg)

    def _mode(self, rm: RankMemory) -> Literal["direct", "staged"]:
        return self._modes.mode(rm)

    # -------------------------------------------------------------- staying true
    def _watch(self, rank: int, reply: Reply) -> None:
        """Every ping reply while serving: withdraw at once if the engine is no longer what we published."""
        if not self._watched.watches(rank) or self.withdrawn or self._record is None:
            return
        why = self._watched.change(rank, reply)
        if why:
            self.withdraw(why, f"rank {rank} changed ({why}: state {reply.state}, weights version "
                               f"{reply.weights_version})")

    def withdraw(self, reason: str, detail: str) -> None:
        self.withdrawn = reason
        self.server.stop_serving()  # now: no new reader, sessions in progress end
        self.metrics.withdrawals.labels(self.engine.model, reason).inc()
        self.metrics.set_role(self.engine.model, "withdrawn")
        self.metrics.source_published.labels(self.engine.model).set(0)
        self.log.warning("withdrawing as a source: %s", detail)
        self._withdrawing = asyncio.get_running_loop().create_task(self._withdraw_record())

    async def _withdraw_record(self) -> None:
        if self.published:
            self.published = False
            try:
                await self.coord.withdraw(self.engine.fp, self.agents.names())
            except CoordinatorUnavailable as e:
                self.log.warning("could not withdraw from Redis (%s); the entry expires within MX_SOURCE_TTL", e)

    # -------------------------------------------------------------- heartbeat
    async def keep_publishing(self) -> None:
        """Heartbeat; re-publish when Redis forgot us; re-publish after a rebuild once the engine is ready again."""
        self.log.info("serving as a source of %s", self.engine.fp[:12])
        beat_fail_logged = False
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            self.failpoints.hit("task.heartbeat")
            if self.withdrawn:
                await self._maybe_republish()
                continue
            try:
                if not self.published or not await self.coord.heartbeat(self.engine.fp, self.agents.names()):
                    if self.published:
                        self.log.warning("Redis forgot this source (restart or eviction); re-publishing")
                    await self.agents.put_all(self.coord)
                    assert self._record is not None
                    await self.coord.publish(self._record, self.agents.names())
                    self.published = True
                    self.metrics.source_published.labels(self.engine.model).set(1)
                beat_fail_logged = False
            except CoordinatorUnavailable as e:
                self.metrics.redis_errors.labels(self.engine.model, "heartbeat").inc()
                if not beat_fail_logged:
                    self.log.warning("heartbeat failed (Redis down?): %s", e)
                    beat_fail_logged = True

    async def _maybe_republish(self) -> None:
        if self.withdrawn == "weights_updated":
            return  # the engine serves other bytes than the checkpoint's: never a source for this fingerprint
        replies = await self.engine.states()
        if self._watched.ready_again(replies):
            self.log.info("engine ready again after a change (%s): fresh import and checksums", self.withdrawn)
            await self.become_source([r.manifest for r in replies if r.manifest is not None], verified=False)

    async def close(self) -> None:
        if self._withdrawing is not None:
            with contextlib.suppress(Exception):
                await self._withdrawing
        if self.published:
            try:
                await asyncio.wait_for(self.coord.withdraw(self.engine.fp, self.agents.names()), 5)
            except (CoordinatorUnavailable, TimeoutError) as e:
                self.log.warning("could not withdraw from Redis (%s); the entry expires within MX_SOURCE_TTL", e)
        for rm in self.ranks.values():
            rm.close()
