"""A replica's life: connect -> recover -> role -> seed | receive -> serve -> stop; and again when the engine is
lost (its container restarted or died): a new engine is a new life (run_daemon).

The only module that knows the order; the parts come composed from `build(cfg)` and each step lives in its own
module and logs `phase=<name>` with its duration. Verdicts (release, fallback load) are given only after the
receive fenced its READs; when it cannot, the process exits without a verdict and the engine stays blocked
(fail closed). Exit codes come from sidecar/errors.py by failure type.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
import time

import zmq.asyncio

from sidecar.build import Parts, build
from sidecar.compile_cache.share import CacheShare
from sidecar.config import Config
from sidecar.coordinator import Candidate
from sidecar.errors import (
    CoordinatorUnavailable,
    EngineLost,
    EngineRestarted,
    FatalError,
    FenceError,
    Superseded,
    exit_code,
    without_verdict,
)
from sidecar.explain import explain_no_match
from sidecar.failpoints import FailpointError
from sidecar.metrics import Metrics
from sidecar.recovery import finish_partial_release, take_over_orphans, wait_for_loads
from sidecar.roles import decide, renew_lease
from sidecar.serve_clock import ServeClock
from sidecar.target.attempts import receive_from_any
from sidecar.target.receiver import Result

SHUTDOWN_LIMIT_S = 10.0  # a teardown (withdraw, close agents and sockets) takes well under a second


class Daemon:
    def __init__(self, parts: Parts, clock: ServeClock | None = None) -> None:
        self.p = parts
        self.clock = clock
        self.log = parts.log
        self._t_start = time.monotonic()
        self._released = False
        self._role = "unknown"
        self._no_verdict = False  # fenced out: never tell the engine anything again
        self._exit_code = 0
        self._signalled = False
        self.lost: EngineLost | None = None  # the engine went away under this life

    @property
    def starts_over(self) -> bool:
        """The life ended only because its engine was lost, with every READ of it fenced: the same process runs a
        new life for the next engine. With READs unconfirmed only the process exit ends them: it exits."""
        return self.lost is not None and not self._signalled and not self._no_verdict

    # ------------------------------------------------------------------ the life
    async def _life(self, ctx: zmq.asyncio.Context) -> None:
        p = self.p
        p.agents.start_early()
        manifests = await p.engine.connect(ctx)
        self._named()
        p.agents.prefetch_handles(p.engine, self.log)
        p.sup.spawn("keepalive", p.engine.keepalive())
        replies = await wait_for_loads(p.cfg, p.engine, await p.engine.states(), self.log)
        if all(r.state == "ready" for r in replies):
            self.log.info("engine already holds its weights (it loaded without us); serving them")
            p.metrics.decisions.labels(p.engine.model, "engine_self_loaded").inc()
            await p.publisher.become_source(manifests, verified=False)
        elif any(r.state == "ready" for r in replies):
            self._set_role("source")
            manifests = await finish_partial_release(p.cfg, p.engine, replies, self.log)
            self._release_noted()
            await p.publisher.become_source(manifests, verified=False)
        else:
            await take_over_orphans(p.cfg, p.engine, replies, self.log)
            role = await decide(p.cfg, p.coord, p.engine.fp, p.engine.model, p.metrics, self.log)
            if role.decision in ("seed", "seed_wait_timeout"):  # sources of the model under another fingerprint?
                await explain_no_match(p.coord, p.engine.fp, p.engine.model, manifests[0].identity, self.log)
            if role.decision == "target":
                await self._as_target(role.candidates)
            else:
                await self._as_source(lease=role.holds_lease)
        p.metrics.ready = True
        self.log.info("ready %.2fs after start", time.monotonic() - self._t_start)
        await p.publisher.keep_publishing()

    async def _as_source(self, lease: bool) -> None:
        p = self.p
        self._set_role("source")
        t0 = time.monotonic()
        renew = p.sup.spawn("lease_renewal", renew_lease(p.cfg, p.coord, p.engine.fp, p.engine.model, p.metrics,
                                                         self.log)) if lease else None
        # The lease is kept until the record is in Redis, not only through the load: in CI (2 cores) a seeder's
        # import and checksum outlasted the 3 s lease, a waiting replica took it and read storage a second time.
        try:
            manifests = await p.engine.all("load_from_storage", p.cfg.load_timeout)
            self.log.info("phase=load_from_storage %.2fs", time.monotonic() - t0)
            self._release_noted()
            await p.publisher.become_source(manifests, verified=False)
        finally:
            if renew is not None:
                renew.cancel()
        if lease:
            with contextlib.suppress(CoordinatorUnavailable):
                await p.coord.release_seed(p.engine.fp)

    async def _as_target(self, candidates: list[Candidate]) -> None:
        p = self.p
        self._set_role("target")
        t0 = time.monotonic()
        ahead = asyncio.ensure_future(self._set_up_ahead(candidates[0]))
        try:
            manifests = await p.engine.all("prepare_target", p.cfg.load_timeout)  # pings go on meanwhile
        except BaseException:
            ahead.cancel()
            raise
        self.log.info("phase=prepare_target %.2fs", time.monotonic() - t0)
        await ahead
        # Published before engine memory is registered: the source needs it only to answer us, and a holder of
        # metadata that lists registered memory can WRITE it (docs/SECURITY-NIXL.md). Every agent the import will
        # use exists by then: measured on an H100, the compile cache's file receive made its host-memory agent at
        # import, after this put; the source refused its Hello ("no metadata for agent") and the receive failed.
        await p.agents.ready()
        await p.agents.ensure(p.agents.kinds_for(manifests))
        await p.agents.put_all(p.coord)
        refresh = p.sup.spawn("agent_refresh", p.agents.keep_published(p.coord, p.cfg.source_ttl / 3, self.log))
        ranks = await p.agents.import_ranks(manifests, p.publisher.ranks, p.engine.model, p.metrics, self.log)
        p.publisher.adopt(ranks)
        async def attempt(cand: Candidate) -> Result:
            try:
                return await p.receiver.receive_from(cand, ranks)
            finally:
                p.receiver.release_peers()

        try:
            received = await receive_from_any(p.cfg, p.coord, p.engine.fp, self.log, candidates, attempt)
        finally:
            refresh.cancel()
            p.receiver.release_peers()
        if received:
            t1 = time.monotonic()
            await p.engine.all("weights_ready", p.cfg.load_timeout)
            self.log.info("phase=release %.2fs: engine continues on verified weights", time.monotonic() - t1)
            self._release_noted()
            await p.publisher.become_source(manifests, verified=True)
            return
        self.log.warning("no source delivered; falling back to storage")
        p.metrics.transfers.labels(p.engine.model, "target", "fell_back_to_storage").inc()
        t1 = time.monotonic()
        try:
            p.failpoints.hit("release_attempt")  # bench: `raise` keeps the mapping, the "before" figure
            released = p.publisher.release()
            self.log.info("phase=release_attempt %.2fs: %.2f GB of the failed attempt unmapped before the storage "
                          "load", time.monotonic() - t1, released / 1e9)
        except FailpointError:
            self.log.warning("failpoint release_attempt: the failed attempt's memory stays mapped during the load")
        manifests = await p.engine.all("load_from_storage", p.cfg.load_timeout)
        self.log.info("phase=load_from_storage %.2fs (fallback)", time.monotonic() - t1)
        await p.failpoints.ahit("after_fallback_load")  # tests: hold the peak long enough to be sampled
        self._release_noted()
        await p.publisher.become_source(manifests, verified=False)

    async def _set_up_ahead(self, first: Candidate) -> None:
        """While the engine prepares: load the first source's agents and connect to them."""
        p = self.p
        await p.agents.ready()
        transports = {m.tp_rank: tr for m in p.engine.latest_manifests()
                      if (tr := p.agents.transport_for(m)) is not None}
        await p.receiver.preconnect(first, transports)

    # ------------------------------------------------------------------ start and stop
    async def run(self) -> int:
        p = self.p
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal)
        if not p.keys.enabled:
            self.log.warning("NO DEPLOYMENT KEY (MX_AUTH_KEY_FILE): Redis records, peer messages and engine "
                             "commands are UNAUTHENTICATED; anyone who can write Redis decides what replicas load")
        await p.http.start()
        ctx = zmq.asyncio.Context()
        life = loop.create_task(self._life(ctx))
        stopper = loop.create_task(p.stop.wait())
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
            p.metrics.fence_failures.labels(p.engine.model).inc()
            self.log.error("%s: exiting WITHOUT a verdict; the engine stays blocked until a new sidecar takes over "
                           "(fail closed)", e)
            self._no_verdict, self._exit_code = True, exit_code(e)
        except EngineLost as e:
            self.lost, self._exit_code = e, exit_code(e)
        except (FatalError, Superseded) as e:
            self.log.error("fatal: %s", e)
            self._no_verdict = self._no_verdict or without_verdict(e)
            self._exit_code = exit_code(e)
        finally:
            stopper.cancel()
            if isinstance(p.sup.exc, EngineLost):
                self.lost = self.lost or p.sup.exc
            if p.sup.exc is not None:
                self._exit_code = self._exit_code or exit_code(p.sup.exc)
            await self._shutdown()
            ctx.term()
        return self._exit_code

    def _on_signal(self) -> None:
        self._signalled = True
        self.p.stop.set()

    async def _shutdown(self) -> None:
        p = self.p
        p.metrics.ready = False
        await p.failpoints.ahit("shutdown")  # tests: keep /healthz observable a moment before the exit
        watchdog = threading.Timer(SHUTDOWN_LIMIT_S, self._stuck_teardown)
        watchdog.daemon = True
        watchdog.start()
        try:
            await self._teardown()
        finally:
            if self.starts_over:  # the process goes on with a new life; otherwise it stays armed until the exit
                watchdog.cancel()

    def _stuck_teardown(self) -> None:
        """The teardown did not end: leave with the life's exit code anyway (no verdict was given, none will be),
        so that Kubernetes restarts the container. Measured: a target fenced out while its source was SIGSTOPped
        never logged "stopped" within 20 s under CI load."""
        self.log.error("shutdown still not finished after %.0fs (a NIXL/UCX or socket teardown is stuck); exiting "
                       "with code %d", SHUTDOWN_LIMIT_S, self._exit_code)
        logging.shutdown()
        os._exit(self._exit_code)

    async def _teardown(self) -> None:
        p = self.p
        await p.failpoints.ahit("teardown")  # tests: a teardown that never ends
        await p.sup.close()
        if p.engine.unfenced and not self._no_verdict:
            self.log.error("READs of ranks %s could not be confirmed finished: exiting WITHOUT a verdict (no abort); "
                           "the engine stays blocked until a new sidecar takes over (fail closed)",
                           sorted(p.engine.unfenced))
            self._no_verdict = True
            fence = exit_code(FenceError("unfenced"))
            self._exit_code = fence if self.lost is not None else (self._exit_code or fence)
        if p.engine.heard() and not self._released and not self._no_verdict and self.lost is None:
            # Stopped mid-way (SIGTERM, fatal error) with every READ fenced: whatever landed is void. The hook
            # goes back to waiting, so a restarted sidecar starts over and a dead one times out into storage.
            await p.engine.try_all("abort", 2.0)
        await p.server.close()
        await p.publisher.close()
        await p.agents.aclose()
        await p.engine.aclose()
        with contextlib.suppress(Exception):
            await p.coord.close()
        if self.starts_over:
            self.log.warning("%s; withdrawn and the old engine's memory dropped: the replica's life starts over "
                             "for the engine at %s", self.lost, p.cfg.rank_address(0))
            return
        await p.http.close()
        self.log.info("stopped")

    # ------------------------------------------------------------------ bookkeeping
    def _named(self) -> None:
        p = self.p
        model = p.engine.model
        p.server.model = model
        self.log.set(model=model)
        p.metrics.set_role(model, "unknown")
        p.metrics.records_authenticated.labels(model).set(1 if p.keys.enabled else 0)
        self.log.info("phase=connect: %d ranks, fingerprint %s, session %s", len(p.engine.links), p.engine.fp,
                      p.engine.session[:8])

    def _set_role(self, role: str) -> None:
        self.log.set(role=role)
        self.p.metrics.set_role(self.p.engine.model, role)
        self._role = role

    def _release_noted(self) -> None:
        if not self._released:
            self._released = True
            dt = time.monotonic() - self._t_start
            self.p.metrics.time_to_ready.labels(self.p.engine.model, self._role).set(dt)
            self.log.info("engine released %.2fs after sidecar start", dt)
            if self.clock is not None:
                self.clock.released(self.p.engine.model, self._role)


def _side_task_ended(metrics: Metrics, what: str, task: asyncio.Task[None]) -> None:
    """The compile cache and the serve clock are side tasks: a failure is logged and counted, the weights' life goes
    on (a waiting engine got a "failed" verdict, or stops waiting after MX_COMPILE_CACHE_WAIT, and compiles)."""
    if task.cancelled() or (e := task.exception()) is None:
        return
    metrics.task_failures.labels("?", what).inc()
    logging.getLogger(f"mx.{what}").error("%s: stopped: %s: %s (the weights' life goes on)", what,
                                          type(e).__name__, e)


def run_daemon(cfg: Config) -> int:
    import uvloop

    async def go() -> int:
        carried = None
        clock: ServeClock | None = None
        side: list[asyncio.Task[None]] = []  # one of each per process: they outlive an engine's life
        try:
            while True:
                parts = build(cfg, carried)
                if not side:
                    if cfg.engine_ready_url:
                        clock = ServeClock(cfg.engine_ready_url, cfg.poll_interval, parts.metrics)
                        side.append(asyncio.create_task(clock.run(), name="serve_clock"))
                    if cfg.compile_cache_dir:
                        cache = CacheShare(cfg, parts.metrics, clock)
                        side.append(asyncio.create_task(cache.run(), name="compile_cache"))
                    for t in side:
                        t.add_done_callback(functools.partial(_side_task_ended, parts.metrics, t.get_name()))
                daemon = Daemon(parts, clock)
                code = await daemon.run()
                if not daemon.starts_over:
                    return code
                reason = "restarted" if isinstance(daemon.lost, EngineRestarted) else "gone"
                parts.metrics.engine_restarts.labels(parts.engine.model, reason).inc()
                carried = (parts.metrics, parts.http)
        finally:
            for t in side:
                t.cancel()
            await asyncio.gather(*side, return_exceptions=True)

    return uvloop.run(go())
