"""The compile cache's part of a replica's life, beside the weights' (one per daemon process, across engine lives):

  start the cache's sidecar -> answer each engine request (fetch.py: find, receive, verify, install) ->
  engine serves (sidecar/serve_clock.py): whether the engine used what was installed ->
  the root settles -> publish this replica's cache (publish.py) until the daemon stops.

An optimisation only: every failure here is logged, counted and ends in "the engine compiles as it would have"
(the engine stops waiting after MX_COMPILE_CACHE_WAIT); the weights' life never depends on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from runtime_hooks.compile_cache import CacheRequest, CacheVerdict, Exchange
from sidecar.compile_cache.child import CacheDaemon, cache_config
from sidecar.compile_cache.fetch import Held, fetch, install_units, make_verdict
from sidecar.compile_cache.publish import CachePublication, cache_files, settle
from sidecar.config import Config
from sidecar.failpoints import Failpoints
from sidecar.metrics import Metrics
from sidecar.serve_clock import ServeClock

log = logging.getLogger("mx.compile_cache")

REQUEST_POLL_S = 0.25  # the engine's request is a file of another container: no event; 4 stats a second
SETTLE_LIMIT_S = 600.0  # a root still changing after 10 min of serving is not a cache to hand out


class CacheShare:
    def __init__(self, cfg: Config, metrics: Metrics, clock: ServeClock | None) -> None:
        self.cfg = cfg
        self.cache_cfg = cache_config(cfg)
        self.metrics = metrics
        self.clock = clock  # None without MX_ENGINE_READY_URL: installs, never publishes
        self.root = Path(cfg.compile_cache_dir)
        self.ex = Exchange(self.root)
        self.request: CacheRequest | None = None  # the "compile" request (the engine's full key) and its verdict
        self.verdict: CacheVerdict | None = None
        self.ahead: tuple[str, CacheVerdict] | None = None  # the "ahead" request's model and verdict
        self.held: Held | None = None  # what the "ahead" receive kept for the "compile" request
        self._daemon = CacheDaemon(cfg)
        self.failpoints = Failpoints(cfg.test_failpoints)
        self._publication: CachePublication | None = None

    @property
    def model(self) -> str:
        return self.request.model if self.request is not None else "?"

    async def run(self) -> None:
        """Until cancelled (the daemon's end)."""
        await self._daemon.start()
        await asyncio.to_thread(self.ex.announce)
        answering = asyncio.create_task(self._answer_requests(), name="compile-cache-requests")
        try:
            await self._after_ready()
            await answering  # runs until cancelled
        except Exception as e:
            await asyncio.to_thread(self._fail_pending, e)
            raise
        finally:
            answering.cancel()
            self._drop_held()
            if self._publication is not None:
                self.metrics.compile_cache_published.labels(self.model).set(0)
                await asyncio.to_thread(self._publication.close)
            await self._daemon.stop()

    def _fail_pending(self, e: BaseException) -> None:
        """A request not answered yet gets "failed": the engine compiles now instead of after its wait."""
        try:
            req = self.ex.pending_request()
            if req is not None and (self.verdict is None or self.verdict.token != req.token):
                self.ex.answer(make_verdict(req, "failed", f"the sidecar's cache task stopped: {e}", time.monotonic()))
        except (ValueError, OSError) as err:
            log.warning("compile cache: could not answer the pending request: %s", err)

    # ------------------------------------------------------------------ requests
    async def _answer_requests(self) -> None:
        answered = ""
        while True:
            try:
                req = await asyncio.to_thread(self.ex.pending_request)
            except (ValueError, OSError) as e:
                log.warning("compile cache: unreadable request (%s); the engine compiles on its own", e)
                req = None
                answered = "unreadable"
                await asyncio.sleep(5.0)
            if req is not None and req.token != answered:
                answered = req.token
                await self._answer(req)
            await asyncio.sleep(REQUEST_POLL_S)

    async def _answer(self, req: CacheRequest) -> None:
        if req.stage == "compile":
            self.request = req
        log.info("compile cache: the engine asks%s for %s with key %s", " ahead" if req.stage == "ahead" else "",
                 req.model, " ".join(f"{k}={v}" for k, v in sorted(req.key.items())))
        t0 = time.monotonic()
        held, self.held = self.held, None
        try:
            verdict, self.held = await asyncio.to_thread(fetch, self.cfg, self.cache_cfg, req, self.ex,
                                                         self.failpoints, held)
        except Exception as e:  # an install that broke half-way: say so, never leave the engine waiting
            log.exception("compile cache: fetching failed")
            if held is not None:
                held.drop()
            verdict = make_verdict(req, "failed", f"{type(e).__name__}: {e}", t0)
        await asyncio.to_thread(self.ex.answer, verdict)
        if req.stage == "ahead":
            self.ahead = (req.model, verdict)
            if self.clock is not None:
                self.clock.cache_ahead_answered(verdict.seconds)
            log.info("phase=compile_cache_ahead %.2fs: %s, %s%s", verdict.seconds, verdict.result, verdict.detail,
                     "; the rest is kept for the engine's compile request" if self.held else "")
            if verdict.result != "installed":  # installed: used or rewritten once the engine serves
                self.metrics.compile_cache_ahead.labels(req.model, verdict.result).inc()
            return
        self.verdict = verdict
        if self.clock is not None:  # the engine waited for this verdict, whatever it says
            self.clock.cache_answered(req.model, verdict.seconds, time.monotonic())
        log.info("phase=compile_cache %.2fs: %s, %s", verdict.seconds, verdict.result, verdict.detail)
        if verdict.result != "installed":  # installed: hit or miss once the engine serves
            self.metrics.compile_cache.labels(req.model, verdict.result).inc()

    def _drop_held(self) -> None:
        if self.held is not None:
            self.held.drop()
            self.held = None

    # ------------------------------------------------------------------ once the engine serves
    async def _after_ready(self) -> None:
        if self.clock is None:
            log.warning("compile cache: MX_ENGINE_READY_URL is empty: caches are installed, never published, and "
                        "the time to serve is not measured")
            return
        await self.clock.serving.wait()
        t_ready = self.clock.ready_at or time.monotonic()
        self._drop_held()  # the engine serves: it asked for its compile cache already, or never will
        await asyncio.to_thread(self._judge_ahead)
        await asyncio.to_thread(self._judge_install)
        if self.request is None:
            log.info("compile cache: the engine asked for none (it does not compile, or its plugin is off): "
                     "nothing to publish")
            return
        snap = await settle(self.root, self.cfg.compile_cache_settle, SETTLE_LIMIT_S)
        if snap is None:
            log.warning("compile cache: %s still changed after %.0fs of serving; not published", self.root,
                        SETTLE_LIMIT_S)
            return
        if not snap:
            log.info("compile cache: %s holds no cache files; nothing to publish", self.root)
            return
        pub = CachePublication(self.cache_cfg, self.root, self.request.model, self.request.key)
        self._publication = pub  # closed on the way out, even half-open
        try:
            nbytes = await asyncio.to_thread(pub.open, sorted(snap))
        except Exception as e:  # this replica's cache is not served; requests are still answered
            log.error("compile cache: publishing failed (%s: %s); this replica does not serve its cache",
                      type(e).__name__, e)
            return
        self.metrics.compile_cache_published.labels(self.model).set(1)
        log.info("phase=compile_cache_publish %.2fs after ready: %d files, %.1f MB, key %s",
                 time.monotonic() - t_ready, len(snap), nbytes / 1e6,
                 " ".join(f"{k}={v}" for k, v in sorted(self.request.key.items())))

    def _judge_install(self) -> None:
        """Installed, then: a hit when the engine wrote nothing into the cache directories beside what came,
        a miss when it compiled anew (its own key differed from what the plugin computed, or a graph was missing)."""
        v = self.verdict
        if v is None or v.result != "installed":
            return
        installed, ours = set(v.installed), set(v.files)
        units = install_units(cache_files(self.root), self.request.units if self.request else [])
        # New files in an installed directory, anything written after the install, or an installed file rewritten
        # (vLLM 0.32 on CPU fails to load its own AOT artifact and saves it again: measured, docs/VLLM.md).
        new = sorted(p for unit, paths in units.items() for p in paths
                     if (p not in ours and unit in installed) or _newer(self.root / p, v.at))
        result = "miss" if new else "hit"
        self.metrics.compile_cache.labels(self.model, result).inc()
        if new:
            log.warning("compile cache: miss: the engine compiled anew, %d new files beside the %d installed (e.g. %s)",
                        len(new), len(ours), new[0])
        else:
            log.info("compile cache: hit: the engine compiled nothing beside the %d installed files", len(ours))

    def _judge_ahead(self) -> None:
        """Installed ahead, then: used when the engine kept every file (vLLM rewrites a modelinfos file whose module
        hash is not its own), rewritten otherwise."""
        if self.ahead is None or self.ahead[1].result != "installed":
            return
        model, v = self.ahead
        rewritten = sorted(p for p in v.files if _newer(self.root / p, v.at))
        self.metrics.compile_cache_ahead.labels(model, "rewritten" if rewritten else "used").inc()
        if rewritten:
            log.warning("compile cache: %d of the %d files installed ahead were written again by the engine (e.g. "
                        "%s): they did not fit its code", len(rewritten), len(v.files), rewritten[0])
        else:
            log.info("compile cache: the engine kept the %d files installed ahead", len(v.files))


def _newer(path: Path, since: float) -> bool:
    try:
        return os.stat(path).st_mtime >= since
    except FileNotFoundError:
        return False
