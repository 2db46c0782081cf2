"""Time to serve: from the sidecar's start to the engine answering MX_ENGINE_READY_URL, split by phase.

What a user waits for is a serving engine, not weights: once weights take a second, vLLM's own start (compile,
profiling, graph capture) is most of it (docs/BENCHMARKS.md). Measured for every replica whose ready URL is set,
with or without a compile cache; once per sidecar process (an engine restarted under a running sidecar is counted by
mx_engine_restarts_total, not timed again).

  cache_ahead    the engine's wait for what it reads before it builds its config (vLLM: modelinfos/), when asked
  weights        sidecar start -> the engine released (source: loaded from storage; target: received, verified),
                 less cache_ahead (the engine had not started its load then)
  cache_install  the compile cache's look, receive and install, when one was asked for (overlaps the weights)
  engine         the later of release and install -> ready: the engine's compile, profiling, graph capture
"""

from __future__ import annotations

import asyncio
import logging
import time

from sidecar.metrics import Metrics
from sidecar.ready import wait_ready

log = logging.getLogger("mx.serve")


class ServeClock:
    def __init__(self, url: str, interval: float, metrics: Metrics) -> None:
        self.url = url
        self.interval = interval
        self.metrics = metrics
        self.t0 = time.monotonic()
        self.model = "?"
        self.role = "unknown"
        self.released_at: float | None = None
        self.cache_install: tuple[float, float] | None = None  # (seconds, monotonic time of the verdict)
        self.cache_ahead: float | None = None  # seconds the engine waited for its "ahead" verdict
        self.ready_at: float | None = None
        self.serving = asyncio.Event()

    def released(self, model: str, role: str) -> None:
        """The weights' life released the engine (the daemon calls this once per life; the first counts)."""
        if self.released_at is None:
            self.released_at, self.model, self.role = time.monotonic(), model, role

    def cache_answered(self, model: str, seconds: float, at: float) -> None:
        """The sidecar answered the engine's compile cache request (installed or not: the engine waited for it)."""
        self.cache_install = (seconds, at)
        if self.released_at is None:  # the engine asks while it builds the model, before its weights are released
            self.model = model

    def cache_ahead_answered(self, seconds: float) -> None:
        """The "ahead" verdict, which the engine waits for before it builds its config (before its weights)."""
        if self.released_at is None and self.cache_ahead is None:
            self.cache_ahead = seconds

    async def run(self) -> None:
        """Until the engine serves (cancel to stop waiting)."""
        await wait_ready(self.url, self.interval)
        self.ready_at = time.monotonic()
        self._report(self.ready_at)
        self.serving.set()

    def phases(self, t_ready: float) -> dict[str, float]:
        out: dict[str, float] = {}
        start_engine = self.t0
        if self.cache_ahead is not None:
            out["cache_ahead"] = self.cache_ahead
        if self.released_at is not None:
            out["weights"] = self.released_at - self.t0 - (self.cache_ahead or 0.0)
            start_engine = self.released_at
        if self.cache_install is not None:
            out["cache_install"] = self.cache_install[0]
            start_engine = max(start_engine, self.cache_install[1])
        out["engine"] = t_ready - start_engine
        return out

    def _report(self, t_ready: float) -> None:
        total = t_ready - self.t0
        phases = self.phases(t_ready)
        self.metrics.time_to_serve.labels(self.model, self.role).set(total)
        for name, s in phases.items():
            self.metrics.time_to_serve_phase.labels(self.model, name).set(s)
        log.info("phase=serve %.2fs: the engine answers %s (%s)", total, self.url,
                 ", ".join(f"{k} {s:.2f}s" for k, s in phases.items()))
