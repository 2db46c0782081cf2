"""Which sources a target tries, in which order, and how long it waits when they are busy.

Before, a target tried the candidates it saw at its start, in that order: in a burst every target queued behind the
one source there was, and gave up to storage after MX_STALL_TIMEOUT while the targets ahead of it had long become
sources themselves. Now the list is read again after every attempt, and a source whose staging pass is full
("busy", no byte moved) is not a failed attempt: the target tries the next candidate, and when every one is busy it
waits (backing off from MX_POLL_INTERVAL to 2 s) for a place or a new source, within MX_TRANSFER_TIMEOUT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sidecar.config import Config
from sidecar.coordinator import Candidate, Coordinator
from sidecar.errors import CoordinatorUnavailable
from sidecar.logs import Ctx
from sidecar.target.receiver import Result

MAX_BUSY_PAUSE_S = 2.0


async def receive_from_any(cfg: Config, coord: Coordinator, fp: str, log: Ctx, first: list[Candidate],
                           receive: Callable[[Candidate], Awaitable[Result]]) -> bool:
    """True once one source delivered every rank, verified; False: no source did (the caller loads from storage)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + cfg.transfer_timeout
    cands, failed, busy = first, set[str](), set[str]()
    attempts, pause = 0, cfg.poll_interval
    while attempts < cfg.max_source_attempts:
        todo = [c for c in cands if c.replica not in failed and c.replica not in busy]
        if not todo:
            if not busy or loop.time() >= give_up:
                return False
            log.info("every source (%d) is busy; waiting %.2fs for a place or a new source", len(busy), pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_BUSY_PAUSE_S)
            busy.clear()
        else:
            result = await receive(todo[0])  # returns only with no READ in flight
            if result == "ok":
                return True
            if result == "busy":
                busy.add(todo[0].replica)
            else:
                failed.add(todo[0].replica)
                attempts += 1
        try:  # a target that finished meanwhile is a source now, maybe a closer or idler one
            cands = await coord.live_sources(fp)
        except CoordinatorUnavailable as e:
            log.warning("cannot refresh the sources (%s); going on with the list seen before", e)
    return False
