"""Background tasks that cannot die quietly.

Before: the NIXL notification pump, the engine keepalive and the lease renewal ran as bare tasks; one that
raised left `/healthz` at 200 and the replica a zombie source. Now a task that ends with an exception is
counted (`mx_background_task_failures_total{task}`), logged with its cause, flips `/healthz` to 503 and
stops the daemon, which exits non-zero so Kubernetes restarts it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from sidecar.errors import EngineLost
from sidecar.metrics import Metrics

log = logging.getLogger("mx.supervisor")


class Supervisor:
    def __init__(self, metrics: Metrics, model: Callable[[], str], stop: asyncio.Event) -> None:
        self._m = metrics
        self._model = model
        self._stop = stop
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failure: str = ""
        self.exc: BaseException | None = None

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._ended(name, t))
        return task

    def _ended(self, name: str, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self.exc = exc
        if isinstance(exc, EngineLost):  # not a sidecar fault: the daemon starts the replica's life over
            log.warning("%s: this life ends (%s noticed it)", exc, name)
            self._stop.set()
            return
        self.failure = f"background task {name} died: {type(exc).__name__}: {exc}"
        self._m.task_failures.labels(self._model(), name).inc()
        self._m.healthy = False
        log.error("%s; the sidecar is unhealthy and exits", self.failure, exc_info=exc)
        self._stop.set()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
