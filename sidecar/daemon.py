"""A replica's life: connect -> role -> load | receive -> verify -> release -> serve.

The only module that knows the order; each step lives in its own module and logs `phase=<name>` with its
duration. Verdicts (release, fallback load) are given only after the receive fenced its READs; when it
cannot, the process exits without a verdict and the engine stays blocked (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time

import zmq.asyncio

from sidecar.agents import Agents
from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.messages import Reply
from sidecar.coordinator import Candidate, Coordinator
from sidecar.engine import EngineRanks
from sidecar.errors import CoordinatorUnavailable, FatalError, FenceError, Superseded, exit_code, without_verdict
from sidecar.failpoints import Failpoints
from sidecar.logs import Ctx
from sidecar.memory.prefetch import HandlePrefetch
from sidecar.metrics import HttpServer, Metrics
from sidecar.peers import PeerRouter
from sidecar.redis_client import connect as connect_redis
from sidecar.roles import decide, renew_lease
from sidecar.source.publisher import Publisher
from sidecar.source.server import SourceServer
from sidecar.supervisor import Supervisor
from sidecar.target.receiver import Receiver


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.replica_id = f"{cfg.node_name}-{os.getpid()}-{secrets.token_hex(3)}"
        self.metrics = Metrics()
        self.http = HttpServer(self.metrics, cfg.metrics_host, cfg.metrics_port)
        self.log = Ctx(logging.getLogger("mx.daemon"), {"model": "?", "role": "starting"})
        self.keys = Keyring.from_file(cfg.auth_key_file)
        self.failpoints = Failpoints(cfg.test_failpoints)
        self.stop = asyncio.Event()
        self.sup = Supervisor(self.metrics, lambda: self.engine.model, self.stop)
        self.engine = EngineRanks(cfg, self.keys, self.metrics, self.log, self.failpoints)
        self._auth_logged: set[tuple[str, str, str]] = set()
        self.coord = Coordinator(connect_redis(cfg), cfg.redis_prefix, self.replica_id, cfg.node_name, cfg.source_ttl,
                                 cfg.max_message_bytes, cfg.max_metadata_bytes, self.keys,
                                 lambda who, why: self._auth_failed("redis", who, why))
        self.server = SourceServer(cfg, "?", self.coord, self.metrics, self.keys)
        self.router = PeerRouter(self.server.on_message,  # type: ignore[arg-type]
                                 lambda why: self.metrics.bad_messages.labels(self.engine.model, "nixl").inc(),
                                 self.keys, lambda peer, why: self._auth_failed("peer", peer, why))
        self.agents = Agents(self.replica_id, self.router, self.sup.spawn, self.failpoints)
        self.publisher = Publisher(cfg, self.replica_id, self.coord, self.agents, self.engine, self.server,
                                   self.metrics, self.log, self.failpoints)
        self.receiver = Receiver(cfg, self.coord, self.router, self.engine, self.metrics, self.log, self.keys,
                                 self.failpoints)
        self._t_start = time.monotonic()
        self._released = False
        self._role = "unknown"
        self._no_verdict = False  # fenced out: never tell the engine anything again
        self._exit_code = 0

    # ------------------------------------------------------------------ entry point
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop.set)
        if not self.keys.enabled:
            self.log.warning("NO DEPLOYMENT KEY (MX_AUTH_KEY_FILE): Redis records, peer messages and engine "
                             "commands are UNAUTHENTICATED; anyone who can write Redis decides what replicas load")
        await self.http.start()
        ctx = zmq.asyncio.Context()
        life = loop.create_task(self._life(ctx))
        stopper = loop.create_task(self.stop.wait())
        try:
            await asyncio.wait({life, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not life.done():
                self.log.info("stop requested")
                # Cancel until it sticks: Python 3.11's wait_for can lose a cancellation that races the inner
                # future's completion (seen: a SIGTERM between release and publish, and the sidecar served on).
                while not life.done():
                    life.cancel()
                    await asyncio.wait({life}, timeout=1.0)
            if not life.cancelled():
                life.result()
        except FenceError as e:
            self.metrics.fence_failures.labels(self.engine.model).inc()
            self.log.error("%s: exiting WITHOUT a verdict; the engine stays blocked until a new sidecar takes over "
                           "(fail closed)", e)
            self._no_verdict, self._exit_code = True, exit_code(e)
        except (FatalError, Superseded) as e:
            self.log.error("fatal: %s", e)
            self._no_verdict = self._no_verdict or without_verdict(e)
            self._exit_code = exit_code(e)
        finally:
            stopper.cancel()
            if self.sup.exc is not None:
                self._exit_code = self._exit_code or exit_code(self.sup.exc)
            await self._shutdown()
            ctx.term()
        return self._exit_code

    async def _life(self, ctx: zmq.asyncio.Context) -> None:
        self.agents.start_early()
        manifests = await self.engine.connect(ctx)
        self._named()
        self._prefetch_handles()
        self.sup.spawn("keepalive", self.engine.keepalive())
        replies = await self.engine.states()
        if all(r.state == "ready" for r in replies):
            self.log.info("engine already holds its weights (it loaded without us); serving them")
            self.metrics.decisions.labels(self.engine.model, "engine_self_loaded").inc()
            await self.publisher.become_source(manifests, verified=False)
        elif any(r.state == "ready" for r in replies):
            await self._finish_partial_release(replies)
        else:
            await self._take_over_orphans(replies)
            role = await decide(self.cfg, self.coord, self.engine.fp, self.engine.model, self.metrics, self.log)
            if role.decision == "target":
                await self._as_target(role.candidates)
            else:
                await self._as_source(lease=role.holds_lease)
        self.metrics.ready = True
        self.log.info("ready %.2fs after start", time.monotonic() - self._t_start)
        await self.publisher.keep_publishing()

    # ------------------------------------------------------------------ phases
    async def _as_source(self, lease: bool) -> None:
        self._set_role("source")
        t0 = time.monotonic()
        renew = self.sup.spawn("lease_renewal", renew_lease(self.cfg, self.coord, self.engine.fp, self.engine.model,
                                                            self.metrics, self.log)) if lease else None
        try:
            manifests = await self.engine.all("load_from_storage", self.cfg.load_timeout)
        finally:
            if renew is not None:
                renew.cancel()
        self.log.info("phase=load_from_storage %.2fs", time.monotonic() - t0)
        self._release_noted()
        await self.publisher.become_source(manifests, verified=False)
        if lease:
            with contextlib.suppress(CoordinatorUnavailable):
                await self.coord.release_seed(self.engine.fp)

    async def _as_target(self, candidates: list[Candidate]) -> None:
        self._set_role("target")
        t0 = time.monotonic()
        ahead = asyncio.ensure_future(self._set_up_ahead(candidates[0]))
        try:
            manifests = await self.engine.all("prepare_target", self.cfg.load_timeout)  # pings go on meanwhile
        except BaseException:
            ahead.cancel()
            raise
        self.log.info("phase=prepare_target %.2fs", time.monotonic() - t0)
        await ahead
        # Published before engine memory is registered: the source needs it only to answer us, and a holder of
        # metadata that lists registered memory can WRITE it (docs/SECURITY-NIXL.md).
        await self.agents.put_all(self.coord)
        ranks = await self.agents.import_ranks(manifests, self.publisher.ranks, self.engine.model, self.metrics,
                                               self.log)
        self.publisher.ranks = ranks
        try:
            for cand in candidates[: self.cfg.max_source_attempts]:
                received = await self.receiver.receive_from(cand, ranks)  # returns only with no READ in flight
                self.receiver.release_peers()
                if received:
                    t1 = time.monotonic()
                    await self.engine.all("weights_ready", self.cfg.load_timeout)
                    self.log.info("phase=release %.2fs: engine continues on verified weights", time.monotonic() - t1)
                    self._release_noted()
                    await self.publisher.become_source(manifests, verified=True)
                    return
        finally:
            self.receiver.release_peers()
        self.log.warning("no source delivered; falling back to storage")
        self.metrics.transfers.labels(self.engine.model, "target", "fell_back_to_storage").inc()
        t1 = time.monotonic()
        manifests = await self.engine.all("load_from_storage", self.cfg.load_timeout)
        self.log.info("phase=load_from_storage %.2fs (fallback)", time.monotonic() - t1)
        self._release_noted()
        await self.publisher.become_source(manifests, verified=False)

    async def _set_up_ahead(self, first: Candidate) -> None:
        """While the engine prepares: load the first source's agents and connect to them."""
        await self.agents.ready()
        transports = {m.tp_rank: tr for m in self.engine.latest_manifests()
                      if (tr := self.agents.transport_for(m)) is not None}
        await self.receiver.preconnect(first, transports)

    async def _take_over_orphans(self, replies: list[Reply]) -> None:
        """Ranks prepared by a sidecar that died: wait until the hook agrees it is gone, then void its bytes."""
        orphans = [r for r in replies if r.state in ("receiving", "preparing") and r.owner != self.engine.session]
        if not orphans:
            return
        t0 = time.monotonic()
        self.log.warning("%d ranks were being received by an earlier sidecar; taking them over once the hook "
                         "sees it silent for MX_SIDECAR_TIMEOUT (its READs may still land until then)", len(orphans))
        while True:
            replies = await self.engine.states()
            busy = [r for r in replies if r.state in ("receiving", "preparing") and r.owner != self.engine.session]
            if not busy:
                break
            if all(r.state == "receiving" and r.owner_silent_s >= self.cfg.sidecar_timeout for r in busy):
                await self.engine.all("abort", self.cfg.request_timeout,
                                      [r.manifest.tp_rank for r in busy if r.manifest is not None])
                break
            wait = max(self.cfg.sidecar_timeout - min(r.owner_silent_s for r in busy), 0.1)
            await asyncio.sleep(min(wait, self.engine.ping_interval()))
        self.log.info("phase=takeover %.2fs: the earlier session's bytes are void", time.monotonic() - t0)

    async def _finish_partial_release(self, replies: list[Reply]) -> None:
        """An earlier sidecar released some ranks and died: the rest load from storage, then all are served."""
        await self._take_over_orphans(replies)
        replies = await self.engine.states()
        rest = [r.manifest.tp_rank for r in replies if r.state != "ready" and r.manifest is not None]
        self.log.warning("ranks %s were not released by the earlier sidecar: loading them from storage", rest)
        self._set_role("source")
        await self.engine.all("load_from_storage", self.cfg.load_timeout, rest)
        self._release_noted()
        manifests = [r.manifest for r in await self.engine.states() if r.manifest is not None]
        await self.publisher.become_source(manifests, verified=False)

    # ------------------------------------------------------------------ helpers
    def _named(self) -> None:
        model = self.engine.model
        self.server.model = model
        self.log.set(model=model)
        self.metrics.set_role(model, "unknown")
        self.metrics.records_authenticated.labels(model).set(1 if self.keys.enabled else 0)
        self.log.info("phase=connect: %d ranks, fingerprint %s, session %s", len(self.engine.links), self.engine.fp,
                      self.engine.session[:8])

    def _prefetch_handles(self) -> None:
        """Map the handles the engine offers before it is ready, off the critical path (sidecar.memory.prefetch)."""
        pf = self.agents.prefetch = HandlePrefetch(len(self.engine.links), self.log)
        self.engine.observers.append(pf.offer)
        for link in self.engine.links:
            if link.last_reply is not None:
                pf.offer(link.rank, link.last_reply)

    def _set_role(self, role: str) -> None:
        self.log.set(role=role)
        self.metrics.set_role(self.engine.model, role)
        self._role = role

    def _release_noted(self) -> None:
        if not self._released:
            self._released = True
            dt = time.monotonic() - self._t_start
            self.metrics.time_to_ready.labels(self.engine.model, self._role).set(dt)
            self.log.info("engine released %.2fs after sidecar start", dt)

    def _auth_failed(self, channel: str, who: str, reason: str) -> None:
        self.metrics.auth_failures.labels(self.engine.model, channel, reason).inc()
        if (channel, who, reason) not in self._auth_logged and len(self._auth_logged) < 1000:
            self._auth_logged.add((channel, who, reason))  # once per peer: a flood must not flood the log
            self.log.warning("refused unauthenticated %s input from %s: %s", channel, who, reason)

    async def _shutdown(self) -> None:
        self.metrics.ready = False
        await self.failpoints.ahit("shutdown")  # tests: keep /healthz observable a moment before the exit
        await self.sup.close()
        if self.engine.links and not self._released and not self._no_verdict:
            # Stopped mid-way (SIGTERM, fatal error) with every READ fenced: whatever landed is void. The hook
            # goes back to waiting, so a restarted sidecar starts over and a dead one times out into storage.
            await self.engine.try_all("abort", 2.0)
        await self.server.close()
        await self.publisher.close()
        if self.agents.prefetch is not None:
            await self.agents.prefetch.aclose()
        self.agents.close()
        await self.engine.aclose()
        with contextlib.suppress(Exception):
            await self.coord.close()
        await self.http.close()
        self.log.info("stopped")


def run_daemon(cfg: Config) -> int:
    import uvloop

    async def go() -> int:
        return await Daemon(cfg).run()

    return uvloop.run(go())
