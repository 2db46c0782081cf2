"""A replica's life: connect -> role -> load | receive -> verify -> release -> serve.

The only module that knows the order. Every step logs `phase=<name>` with its duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from typing import Literal

import zmq.asyncio

from sidecar.config import Config
from sidecar.coordinator import Candidate, Coordinator, CoordinatorUnavailable
from sidecar.link import EngineError, EngineLink
from sidecar.logs import Ctx
from sidecar.metrics import HttpServer, Metrics
from sidecar.peers import PeerRouter
from sidecar.planner import PlanError
from sidecar.protocol import (
    PROTOCOL_VERSION,
    Manifest,
    ProtocolError,
    RankSource,
    SourceRecord,
    replica_fingerprint,
)
from sidecar.pulling import SourceFailed, VerifyError, pull_rank, verify_rank
from sidecar.rank_memory import RankMemory
from sidecar.serving import SourceServer
from sidecar.staging import StagingRing
from sidecar.transport import Transport

ENGINE_GONE_EXIT = 3
ENGINE_PING_FAILURES = 3


class FatalError(RuntimeError):
    """The replica cannot go on (engine failed, inconsistent ranks); the process exits non-zero."""


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.replica_id = f"{cfg.node_name}-{os.getpid()}-{secrets.token_hex(3)}"
        self.metrics = Metrics()
        self.http = HttpServer(self.metrics, cfg.metrics_host, cfg.metrics_port)
        self.log = Ctx(logging.getLogger("mx.daemon"), {"model": "?", "role": "starting"})
        self.model = cfg.model_name or "?"
        self.fp = ""
        self.role = "unknown"
        self.links: list[EngineLink] = []
        self.ranks: dict[int, RankMemory] = {}
        self.transports: dict[tuple[str, int], Transport] = {}
        self.coord = Coordinator(cfg.redis_url, cfg.redis_prefix, self.replica_id, cfg.node_name, cfg.source_ttl,
                                 cfg.max_message_bytes, cfg.max_metadata_bytes)
        self.server = SourceServer(cfg, self.model, self.coord, self.metrics)
        self.router = PeerRouter(self._on_source_msg, self._on_bad_peer_msg)
        self.published = False
        self.stop = asyncio.Event()
        self._record: SourceRecord | None = None
        self._t_start = time.monotonic()
        self._engine_released = False
        self._exit_code = 0
        self._early_agents: asyncio.Task[None] | None = None
        self._agents_s = 0.0
        self._creating: set[tuple[str, int]] = set()
        self._probed: dict[tuple[str, int], Literal["direct", "staged"]] = {}

    # ------------------------------------------------------------------ entry point
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop.set)
        await self.http.start()
        ctx = zmq.asyncio.Context()
        life = loop.create_task(self._life(ctx))
        stopper = loop.create_task(self.stop.wait())
        try:
            await asyncio.wait({life, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if life.done():
                life.result()
            else:
                self.log.info("stop requested")
                life.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await life
        except FatalError as e:
            self.log.error("fatal: %s", e)
            self._exit_code = self._exit_code or 2
        finally:
            stopper.cancel()
            await self._shutdown()
            ctx.term()
        return self._exit_code

    async def _life(self, ctx: zmq.asyncio.Context) -> None:
        self._early_agents = asyncio.get_running_loop().create_task(self._create_transports(self._start_devices()))
        manifests = await self._connect(ctx)
        keepalive = asyncio.get_running_loop().create_task(self._keepalive())
        try:
            states = await self._states()
            if all(s == "ready" for s in states):
                self.log.info("engine already holds its weights (it loaded without us); serving them")
                self.metrics.decisions.labels(self.model, "engine_self_loaded").inc()
                await self._become_source_of(manifests, verified_checksums=None)
            else:
                if "receiving" in states:  # a previous sidecar died mid-transfer: those bytes are void
                    await self._all("abort", self.cfg.request_timeout)
                decision, candidates = await self._decide()
                if decision == "target":
                    await self._as_target(candidates)
                else:
                    await self._as_source(lease=decision == "seed")
            self.metrics.ready = True
            await self._serve()
        finally:
            keepalive.cancel()

    # ------------------------------------------------------------------ phases
    async def _connect(self, ctx: zmq.asyncio.Context) -> list[Manifest]:
        t0 = time.monotonic()
        cfg = self.cfg
        first = EngineLink(ctx, cfg.rank_address(0), 0, cfg.max_message_bytes)
        self.links = [first]
        self.log.info("waiting for engine rank 0 at %s", first.address)
        r0 = await first.wait_until_up(cfg.engine_connect_timeout)
        assert r0.manifest is not None
        tp = cfg.tp_size or r0.manifest.tp_size
        if tp != r0.manifest.tp_size:
            raise FatalError(f"MX_TP_SIZE={cfg.tp_size} but the engine reports tp_size {r0.manifest.tp_size}")
        self.links += [EngineLink(ctx, cfg.rank_address(r), r, cfg.max_message_bytes) for r in range(1, tp)]
        rest = await asyncio.gather(*(lk.wait_until_up(cfg.engine_connect_timeout) for lk in self.links[1:]))
        replies = [r0, *rest]
        manifests = [r.manifest for r in replies if r.manifest is not None]
        for r, m in enumerate(manifests):
            if m.tp_rank != r or m.tp_size != tp or m.model_id != manifests[0].model_id:
                raise FatalError(f"socket of rank {r} answers as rank {m.tp_rank}/{m.tp_size} of {m.model_id}")
        self.fp = replica_fingerprint([m.fingerprint for m in manifests])
        self.model = self.cfg.model_name or manifests[0].model_id
        self.server.model = self.model
        self.log.set(model=self.model)
        self.metrics.set_role(self.model, "unknown")
        self.log.info("phase=connect %.2fs: %d ranks, fingerprint %s", time.monotonic() - t0, tp, self.fp)
        return manifests

    async def _decide(self) -> tuple[str, list[Candidate]]:
        """'target' with candidates, 'seed' (holds the lease), or 'storage' (load without the lease)."""
        t0 = time.monotonic()
        deadline = t0 + self.cfg.seed_wait_timeout
        next_note = t0
        try:
            while True:
                cands = await self.coord.live_sources(self.fp)
                self.metrics.sources_visible.labels(self.model).set(len(cands))
                if cands:
                    return self._decided("target", t0, cands)
                if await self.coord.try_seed(self.fp, self.cfg.seed_lease_ttl):
                    return self._decided("seed", t0, [])
                now = time.monotonic()
                if now >= deadline:
                    self.log.warning("seeder did not publish within %.0fs; loading from storage",
                                     self.cfg.seed_wait_timeout)
                    return self._decided("seed_wait_timeout", t0, [])
                if now >= next_note:
                    seeder = await self.coord.seeder(self.fp)
                    self.log.info("waiting for seeder %s to publish", seeder)
                    next_note = now + 10
                await asyncio.sleep(self.cfg.poll_interval)
        except CoordinatorUnavailable as e:
            self.metrics.redis_errors.labels(self.model, "decide").inc()
            self.log.warning("Redis unavailable (%s): loading from storage without coordination", e)
            return self._decided("redis_down", t0, [])

    def _decided(self, decision: str, t0: float, cands: list[Candidate]) -> tuple[str, list[Candidate]]:
        self.metrics.decisions.labels(self.model, decision).inc()
        self.log.info("phase=role %.2fs: %s (%d live sources)", time.monotonic() - t0, decision, len(cands))
        return decision, cands

    async def _as_source(self, lease: bool) -> None:
        self._set_role("source")
        t0 = time.monotonic()
        renew = asyncio.get_running_loop().create_task(self._renew_lease()) if lease else None
        try:
            replies = await self._all("load_from_storage", self.cfg.load_timeout)
        finally:
            if renew is not None:
                renew.cancel()
        self.log.info("phase=load_from_storage %.2fs", time.monotonic() - t0)
        self._released()
        await self._become_source_of([r for r in replies], verified_checksums=None)
        if lease:
            with contextlib.suppress(CoordinatorUnavailable):
                await self.coord.release_seed(self.fp)

    async def _as_target(self, candidates: list[Candidate]) -> None:
        self._set_role("target")
        t0 = time.monotonic()
        manifests = await self._all("prepare_target", self.cfg.load_timeout)
        self.log.info("phase=prepare_target %.2fs", time.monotonic() - t0)
        await self._import_and_register(manifests)
        await self._put_agents()
        for cand in candidates[: self.cfg.max_source_attempts]:
            if await self._receive_from(cand):
                t1 = time.monotonic()
                await self._all("weights_ready", self.cfg.load_timeout)
                self.log.info("phase=release %.2fs: engine continues on verified weights", time.monotonic() - t1)
                self._released()
                await self._become_source_of(manifests, verified_checksums=True)
                return
        self.log.warning("no source delivered; falling back to storage")
        self.metrics.transfers.labels(self.model, "target", "fell_back_to_storage").inc()
        t1 = time.monotonic()
        replies = await self._all("load_from_storage", self.cfg.load_timeout)
        self.log.info("phase=load_from_storage %.2fs (fallback)", time.monotonic() - t1)
        self._released()
        await self._become_source_of(replies, verified_checksums=None)

    async def _receive_from(self, cand: Candidate) -> bool:
        rec = cand.record
        peer = rec.replica
        by_rank = {r.rank: r for r in rec.ranks}
        t0 = time.monotonic()
        result = "ok"
        counted = False
        try:
            if sorted(by_rank) != sorted(self.ranks) or len(by_rank) != len(rec.ranks):
                raise PlanError(f"source serves ranks {sorted(by_rank)}, we need {sorted(self.ranks)}")
            metas = {a: await self.coord.get_agent(a) for a in {r.agent for r in rec.ranks}}
            await self.coord.reader_delta(self.fp, peer, +1)
            counted = True
            self.log.info("pulling %.2f GB from %s (%s node)", self._total_bytes() / 1e9, peer,
                          "same" if cand.same_node else "other", peer=peer)
            tasks = [asyncio.ensure_future(pull_rank(self.cfg, rm, by_rank[r], metas[by_rank[r].agent],
                                                     self.router, self.metrics, self.log))
                     for r, rm in self.ranks.items()]
            try:
                pulled = await asyncio.gather(*tasks)
            except BaseException:
                # One rank failed: stop the others and let them drain their READs before anything else
                # (a fallback load) touches engine memory.
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            moved = [n for n, _ in pulled]
            await asyncio.gather(*(verify_rank(self.cfg, rm, by_rank[r], v, self.log)
                                   for (r, rm), (_, v) in zip(self.ranks.items(), pulled, strict=True)))
            dt = time.monotonic() - t0
            gbps = sum(moved) / 1e9 / max(dt, 1e-9)
            self.metrics.transfer_seconds.labels(self.model, "target").observe(dt)
            self.metrics.last_rate.labels(self.model, "target").set(gbps * 1e9)
            self.log.info("phase=receive %.2f GB in %.2fs (%.2f GB/s), verified (%s)", sum(moved) / 1e9, dt, gbps,
                          self.cfg.verify, peer=peer)
            if gbps < self.cfg.slow_link_gbps and sum(moved) > 256 << 20:
                self.log.warning("transfer ran at %.2f GB/s, below MX_SLOW_LINK_GBPS=%.2f: check UCX_TLS / the "
                                 "fabric (UCX may have fallen back to TCP)", gbps, self.cfg.slow_link_gbps)
            return True
        except VerifyError as e:
            result = "verify_failed"
            self.log.error("verification failed: %s", e, peer=peer)
        except (PlanError, ProtocolError) as e:
            result = "refused_layout"
            self.log.warning("source refused before any byte moved: %s", e, peer=peer)
        except SourceFailed as e:
            result = "source_failed"
            self.log.warning("source failed: %s", e, peer=peer)
        except CoordinatorUnavailable as e:
            result = "redis_down"
            self.metrics.redis_errors.labels(self.model, "receive").inc()
            self.log.warning("Redis unavailable during receive: %s", e, peer=peer)
        except Exception:  # a bug or an unforeseen NIXL error: counted and logged loudly, next candidate
            result = "error"
            self.log.exception("transfer failed unexpectedly", peer=peer)
        finally:
            self.metrics.transfers.labels(self.model, "target", result).inc()
            if counted:
                with contextlib.suppress(CoordinatorUnavailable):
                    await self.coord.reader_delta(self.fp, peer, -1)
        return False

    async def _become_source_of(self, manifests: list[Manifest], verified_checksums: bool | None) -> None:
        """Import (if the layout changed), stage, checksum, publish."""
        t0 = time.monotonic()
        if not self.ranks or any(self.ranks[m.tp_rank].manifest != m for m in manifests):
            await self._import_and_register(manifests)
        for rm in self.ranks.values():
            if self._mode(rm) == "staged" and rm.ring is None and rm.transport is not None:
                rm.ring = StagingRing(rm.ops, self.cfg.staging_slots, self.cfg.staging_slot_bytes)
                rm.transport.register(rm.ring.slots)
                await self._probe_mode(rm)
                if self._mode(rm) == "staged":
                    self.metrics.registered_bytes.labels(self.model, "staging").inc(rm.ring.nbytes)
                else:
                    rm.transport.deregister_last()
                    rm.ring.close()
                    rm.ring = None
        if self.cfg.verify == "checksum" and not verified_checksums:
            t1 = time.monotonic()
            sums = await asyncio.gather(*(rm.compute_checksums() for rm in self.ranks.values()))
            for rm, s in zip(self.ranks.values(), sums, strict=True):
                rm.checksums = s
            self.log.info("phase=checksum %.2fs over %d tensors", time.monotonic() - t1, sum(len(s) for s in sums))
        self._record = SourceRecord(PROTOCOL_VERSION, self.replica_id, self.cfg.node_name, self.model, self.fp, [
            RankSource(rm.rank, rm.transport.name if rm.transport else "", rm.mem_type, rm.device_id, self._mode(rm),
                       list(rm.manifest.tensors), list(rm.checksums),
                       slots=[(s.addr, s.nbytes) for s in rm.ring.slots] if rm.ring else [],
                       entry_addrs=list(rm.entry_addrs) if self._mode(rm) == "direct" else [])
            for rm in self.ranks.values()], published_at=time.time())
        self.server.serve(self.ranks)
        try:
            await self._put_agents()
            await self.coord.publish(self._record, self._agent_names())
            self.published = True
            self.metrics.source_published.labels(self.model).set(1)
        except CoordinatorUnavailable as e:
            self.metrics.redis_errors.labels(self.model, "publish").inc()
            self.log.warning("cannot publish yet (Redis unavailable: %s); the heartbeat retries", e)
        self._set_role("serving")
        self.log.info("phase=publish %.2fs; ready %.2fs after start", time.monotonic() - t0,
                      time.monotonic() - self._t_start)

    async def _import_and_register(self, manifests: list[Manifest]) -> None:
        t0 = time.monotonic()
        for rm in self.ranks.values():
            rm.close()
        self.ranks = {}
        for m in manifests:
            self.ranks[m.tp_rank] = RankMemory.import_manifest(m)
        t_import = time.monotonic() - t0
        t1 = time.monotonic()
        if self._early_agents is not None:
            await self._early_agents  # usually done: started with the daemon
        await self._create_transports({(rm.mem_type, rm.device_id) for rm in self.ranks.values()})
        t_agents = time.monotonic() - t1
        t2 = time.monotonic()
        for rm in self.ranks.values():
            rm.transport = self.transports[(rm.mem_type, rm.device_id)]
            rm.register_s = rm.transport.register(rm.regions)
        t_reg = time.monotonic() - t2
        engine_bytes = sum(r.nbytes for rm in self.ranks.values() for r in rm.regions)
        self.metrics.registered_bytes.labels(self.model, "engine").set(engine_bytes)
        for phase, v in (("import", t_import), ("register", t_reg), ("agents", self._agents_s)):
            self.metrics.startup_seconds.labels(self.model, phase).set(v)
        self.log.info("phase=import_register %.2fs (import %.3fs of %d handles, agents wait %.2fs, register %.3fs, "
                      "%.2f GB)", time.monotonic() - t0, t_import, sum(len(m.handles) for m in manifests), t_agents,
                      t_reg, engine_bytes / 1e9)

    def _start_devices(self) -> set[tuple[str, int]]:
        """Agents to create at start-up, before the engine is even up (each took 0.5-1.3 s to create).

        One per visible GPU, else one for host memory. A GPU the engine does not use costs an idle agent.
        """
        from sidecar.cuda_memory import preload_torch, visible_device_count

        n = visible_device_count()
        if n:
            preload_torch()  # `import torch` took 2.4-4.9 s on the GPU machines: overlap it with the engine's start
            return {("VRAM", i) for i in range(n)}
        return {("DRAM", 0)}

    async def _create_transports(self, wanted: set[tuple[str, int]]) -> None:
        missing = sorted(wanted - set(self.transports) - self._creating)
        self._creating.update(missing)
        t0 = time.monotonic()
        created = await asyncio.gather(*(asyncio.to_thread(
            Transport, f"{self.replica_id}-{mt.lower()}{dev}", mt, dev) for mt, dev in missing))
        for tr in created:
            self.transports[(tr.mem_type, tr.device_id)] = tr
            tr.start(self.router)
        if missing:
            self._agents_s = max(self._agents_s, time.monotonic() - t0)

    async def _serve(self) -> None:
        self.log.info("serving as a source of %s", self.fp[:12])
        beat_fail_logged = False
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            try:
                if not self.published or not await self.coord.heartbeat(self.fp, self._agent_names()):
                    if self.published:
                        self.log.warning("Redis forgot this source (restart or eviction); re-publishing")
                    await self._put_agents()
                    assert self._record is not None
                    await self.coord.publish(self._record, self._agent_names())
                    self.published = True
                    self.metrics.source_published.labels(self.model).set(1)
                beat_fail_logged = False
            except CoordinatorUnavailable as e:
                self.metrics.redis_errors.labels(self.model, "heartbeat").inc()
                if not beat_fail_logged:
                    self.log.warning("heartbeat failed (Redis down?): %s", e)
                    beat_fail_logged = True

    # ------------------------------------------------------------------ helpers
    async def _all(self, op: str, timeout: float) -> list[Manifest]:
        async def one(link: EngineLink) -> Manifest:
            try:
                reply = await link.request(op, timeout)  # type: ignore[arg-type]
            except EngineError as e:
                self.metrics.engine_errors.labels(self.model, str(link.rank), op).inc()
                raise FatalError(str(e)) from e
            assert reply.manifest is not None
            return reply.manifest

        return list(await asyncio.gather(*(one(lk) for lk in self.links)))

    async def _states(self) -> list[str]:
        try:
            replies = await asyncio.gather(*(lk.request("ping", self.cfg.request_timeout) for lk in self.links))
        except EngineError as e:
            raise FatalError(str(e)) from e
        return [r.state for r in replies]

    async def _keepalive(self) -> None:
        """Ping every rank: keeps the hook from timing out on us, and notices a dead engine."""
        failures = 0
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            try:
                await asyncio.gather(*(lk.request("ping", self.cfg.request_timeout) for lk in self.links))
                failures = 0
            except EngineError as e:
                failures += 1
                self.log.warning("engine ping failed (%d/%d): %s", failures, ENGINE_PING_FAILURES, e)
                if failures >= ENGINE_PING_FAILURES:
                    self.log.error("engine is gone; withdrawing and exiting")
                    self._exit_code = ENGINE_GONE_EXIT
                    self.stop.set()
                    return

    async def _renew_lease(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.seed_lease_ttl / 3)
            try:
                if not await self.coord.renew_seed(self.fp, self.cfg.seed_lease_ttl):
                    self.log.warning("seeding lease lost (expired while loading); another replica may seed too")
            except CoordinatorUnavailable as e:
                self.metrics.redis_errors.labels(self.model, "renew").inc()
                self.log.warning("cannot renew the seeding lease: %s", e)

    async def _put_agents(self) -> None:
        for tr in self.transports.values():
            await self.coord.put_agent(tr.name, tr.metadata())

    def _agent_names(self) -> list[str]:
        return [tr.name for tr in self.transports.values()]

    def _mode(self, rm: RankMemory) -> Literal["direct", "staged"]:
        if self.cfg.source_mode != "auto":
            return self.cfg.source_mode
        # DRAM serves fine where it lies (measured on the CPU machines); imported VRAM is probed once per device
        # and stays staged until the probe says otherwise (DESIGN.md: 0.45 GB/s when re-exported).
        if rm.mem_type == "DRAM":
            return "direct"
        return self._probed.get((rm.mem_type, rm.device_id), "staged")

    async def _probe_mode(self, rm: RankMemory) -> None:
        key = (rm.mem_type, rm.device_id)
        if self.cfg.source_mode != "auto" or rm.mem_type == "DRAM" or key in self._probed or rm.ring is None:
            return
        from sidecar.mode_probe import probe_mode

        t0 = time.monotonic()
        res = await probe_mode(rm, rm.ring.slots[0], f"{self.replica_id}-probe{rm.device_id}")
        self._probed[key] = res.mode  # type: ignore[assignment]
        self.log.info("phase=mode_probe %.2fs device %d: imported memory %.2f GB/s, owned %.2f GB/s -> %s",
                      time.monotonic() - t0, rm.device_id, res.direct_gbps, res.owned_gbps, res.mode, rank=rm.rank)

    def _total_bytes(self) -> int:
        return sum(rm.manifest.total_bytes for rm in self.ranks.values())

    def _set_role(self, role: str) -> None:
        self.role = role
        self.log.set(role=role)
        self.metrics.set_role(self.model, role)

    def _released(self) -> None:
        if not self._engine_released:
            self._engine_released = True
            dt = time.monotonic() - self._t_start
            self.metrics.time_to_ready.labels(self.model, self.role).set(dt)
            self.log.info("engine released %.2fs after sidecar start", dt)

    def _on_source_msg(self, peer: str, msg: object) -> None:
        self.server.on_message(peer, msg)  # type: ignore[arg-type]

    def _on_bad_peer_msg(self, why: str) -> None:
        self.metrics.bad_messages.labels(self.model, "nixl").inc()

    async def _shutdown(self) -> None:
        self.metrics.ready = False
        if self.links and not self._engine_released:
            # Stopped mid-way (SIGTERM, fatal error): whatever landed in engine memory is void. The hook goes back
            # to waiting, so a restarted sidecar starts over and a dead one times out into a storage load.
            with contextlib.suppress(EngineError, TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(lk.request("abort", 2.0) for lk in self.links)), 3)
        if self.published:
            try:
                await asyncio.wait_for(self.coord.withdraw(self.fp, self._agent_names()), 5)
            except (CoordinatorUnavailable, TimeoutError) as e:
                self.log.warning("could not withdraw from Redis (%s); the entry expires within MX_SOURCE_TTL", e)
        await self.server.close()
        for tr in self.transports.values():
            tr.close()
        for rm in self.ranks.values():
            rm.close()
        for lk in self.links:
            lk.close()
        with contextlib.suppress(Exception):
            await self.coord.close()
        await self.http.close()
        self.log.info("stopped")


def run_daemon(cfg: Config) -> int:
    import uvloop

    async def go() -> int:
        return await Daemon(cfg).run()

    return uvloop.run(go())
