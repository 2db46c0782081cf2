"""NIXL agents (one per device, created at start-up) and the engine memory imported and registered with them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from sidecar.contract.messages import CudaIpcHandle, Manifest
from sidecar.coordinator import Coordinator
from sidecar.engine import EngineRanks
from sidecar.errors import CoordinatorUnavailable
from sidecar.failpoints import FailpointError, Failpoints
from sidecar.logs import Ctx
from sidecar.memory.prefetch import HandlePrefetch
from sidecar.memory.rank_memory import RankMemory
from sidecar.metrics import Metrics
from sidecar.transport import Transport

Spawn = Callable[[str, Coroutine[Any, Any, None]], asyncio.Task[None]]


class Agents:
    def __init__(self, replica_id: str, on_notif: Callable[[str, bytes], None], spawn: Spawn,
                 failpoints: Failpoints) -> None:
        self._replica_id = replica_id
        self._on_notif = on_notif
        self._spawn = spawn
        self._fp = failpoints
        self.transports: dict[tuple[str, int], Transport] = {}
        self._creating: set[tuple[str, int]] = set()
        self._early: asyncio.Task[None] | None = None
        self.create_s = 0.0
        self.prefetch: HandlePrefetch | None = None  # the engine's handles mapped ahead, for the first import
        self._published: dict[str, bytes] = {}  # agent name -> the metadata put_all last published

    def start_early(self) -> None:
        """Agents for every visible GPU (else host memory), before the engine is even up (0.5-1.3 s each)."""
        from sidecar.memory.cuda import preload_torch, visible_device_count

        n = visible_device_count()
        if n:
            preload_torch()  # `import torch` took 2.4-4.9 s on the GPU machines: overlap it with the engine's start
        wanted = {("VRAM", i) for i in range(n)} if n else {("DRAM", 0)}
        try:
            self._fp.hit("agents_early")
        except FailpointError:  # tests: nothing ahead, as host memory on a GPU machine (made at import)
            wanted = set()
        self._early = asyncio.get_running_loop().create_task(self.ensure(wanted))

    async def ensure(self, wanted: set[tuple[str, int]]) -> None:
        missing = sorted(wanted - set(self.transports) - self._creating)
        self._creating.update(missing)
        t0 = time.monotonic()
        created = await asyncio.gather(*(asyncio.to_thread(
            Transport, f"{self._replica_id}-{mt.lower()}{dev}", mt, dev) for mt, dev in missing))
        for tr in created:
            self.transports[(tr.mem_type, tr.device_id)] = tr
            tr.start(self._on_notif, self._spawn, self._fp)
        if missing:
            self.create_s = max(self.create_s, time.monotonic() - t0)

    async def ready(self) -> None:
        if self._early is not None:
            await self._early

    def kinds_for(self, manifests: list[Manifest]) -> set[tuple[str, int]]:
        """The agents these ranks' memory will be registered with."""
        return {k for m in manifests if (k := _kind_of(m)) is not None}

    def transport_for(self, m: Manifest) -> Transport | None:
        """The agent a rank's memory will be registered with, known before the engine prepares."""
        k = _kind_of(m)
        return self.transports.get(k) if k is not None else None

    async def import_ranks(self, manifests: list[Manifest], old: dict[int, RankMemory], model: str,
                           metrics: Metrics, log: Ctx) -> dict[int, RankMemory]:
        """Map every rank's handles and register them (per allocation segment). Old ranks are deregistered first."""
        t0 = time.monotonic()  # the import's cost on the critical path includes waiting for a mapping in progress
        prefetch, self.prefetch = self.prefetch, None
        mapped = await prefetch.take() if prefetch is not None else {}
        ahead, t_wait = len(mapped), time.monotonic() - t0
        for rm in old.values():
            rm.close()
        try:
            ranks = {m.tp_rank: RankMemory.import_manifest(m, mapped) for m in manifests}
        finally:
            ahead -= len(mapped)
            for r in mapped.values():  # handles the engine replaced while preparing
                r.close()
        t_import = time.monotonic() - t0
        t1 = time.monotonic()
        await self.ready()  # usually done: started with the daemon
        await self.ensure({(rm.mem_type, rm.device_id) for rm in ranks.values()})
        t_agents = time.monotonic() - t1
        t2 = time.monotonic()
        for rm in ranks.values():
            rm.register(self.transports[(rm.mem_type, rm.device_id)])
        t_reg = time.monotonic() - t2
        engine_bytes = sum(r.nbytes for rm in ranks.values() for r in rm.regions)
        metrics.registered_bytes.labels(model, "engine").set(engine_bytes)
        for phase, v in (("import", t_import), ("register", t_reg), ("agents", self.create_s),
                         ("prefetch", prefetch.seconds if prefetch is not None else 0.0)):
            metrics.startup_seconds.labels(model, phase).set(v)
        log.info("phase=import_register %.2fs (import %.3fs of %d handles, %d mapped ahead (%.3fs waiting for them), "
                 "agents wait %.2fs, register %.3fs, %.2f GB)", time.monotonic() - t0, t_import,
                 sum(len(m.handles) for m in manifests), ahead, t_wait, t_agents, t_reg, engine_bytes / 1e9)
        return ranks

    async def put_all(self, coord: Coordinator) -> None:
        for tr in self.transports.values():
            meta = self._published[tr.name] = tr.metadata()
            await coord.put_agent(tr.name, meta)

    async def keep_published(self, coord: Coordinator, interval: float, log: Ctx) -> None:
        """A target's metadata, kept in Redis until it becomes a source (whose heartbeat keeps it then): a source
        needs it to answer the target at all. Measured before: it expired after MX_SOURCE_TTL, so after one stalled
        source every later candidate dropped the target's Hello unanswered (one more stall each, then storage).
        It re-puts the bytes `put_all` published, taken before engine memory was registered: metadata taken now
        would list that memory, and its holder could WRITE it (docs/SECURITY-NIXL.md)."""
        while True:
            await asyncio.sleep(interval)
            try:
                for name, meta in self._published.items():
                    await coord.put_agent(name, meta)
            except CoordinatorUnavailable as e:  # the next round tries again; a source may still have it cached
                log.warning("cannot refresh this target's agent metadata: %s", e)

    def names(self) -> list[str]:
        return [tr.name for tr in self.transports.values()]

    def prefetch_handles(self, engine: EngineRanks, log: Ctx) -> None:
        """Map the handles the engine offers before it is ready, off the critical path (sidecar.memory.prefetch)."""
        pf = self.prefetch = HandlePrefetch(len(engine.links), log)
        engine.observe(pf.offer)
        for link in engine.links:
            if link.last_reply is not None:
                pf.offer(link.rank, link.last_reply)

    async def aclose(self) -> None:
        if self.prefetch is not None:
            await self.prefetch.aclose()
        for tr in self.transports.values():
            tr.close()


def _kind_of(m: Manifest) -> tuple[str, int] | None:
    """Host memory, or the GPU of the handles the engine offered (none offered: unknown until exposed)."""
    if m.memory_kind == "shm":
        return ("DRAM", 0)
    if m.handles and isinstance(m.handles[0], CudaIpcHandle):
        from sidecar.memory.cuda import device_index_for_uuid

        return ("VRAM", device_index_for_uuid(m.handles[0].device_uuid))
    return None
