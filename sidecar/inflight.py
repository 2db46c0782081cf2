"""The READs of one attempt: post each behind the rank's guard, drive them to completion, drain them at the end.

One loop (`Inflight.drive`) posts READs through a feed and polls the ones in flight, with the stall and deadline
semantics of the whole transfer; `Inflight.drain` is the fence: it returns True only once no READ is in flight
(each finished or failed). NIXL cannot confirm a cancel, so a drain that cannot be confirmed in time returns
False and the caller raises FenceError.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sidecar.errors import SourceFailed, Superseded, TransferError
from sidecar.failpoints import Failpoints
from sidecar.planner import Chunk
from sidecar.transport import BUSY_POLL_S, Transport

Guard = Callable[[], str]  # '' while this session may write the rank, else why not
Feed = Callable[[], Awaitable[bool]]  # posts the next READ if it can; True if it did


@dataclass
class Read:
    """One READ in flight: NIXL's transfer handle and the chunk it writes."""

    handle: Any
    chunk: Chunk


class Inflight:
    """Posts READs into engine memory (each only after the guard allowed it), drives and drains them."""

    def __init__(self, tr: Transport, peer: str, mem_type: str, guard: Guard, failpoints: Failpoints,
                 on_done: Callable[[Chunk], None]) -> None:
        self.tr, self.peer, self._mem_type = tr, peer, mem_type
        self._guard, self._fp, self._on_done = guard, failpoints, on_done
        self.reads: list[Read] = []

    def __len__(self) -> int:
        return len(self.reads)

    async def post(self, chunk: Chunk, local: np.ndarray, remote: np.ndarray, notif: bytes = b"") -> None:
        await self._fp.ahit("before_read")
        why = self._guard()
        if why:
            raise Superseded(why)
        self.reads.append(Read(self.tr.start_read(local, remote, self.peer, self._mem_type, notif), chunk))

    def poll(self) -> bool:
        """Poll every READ once; True if any finished. Raises the first failure, after every finished or failed
        READ left the list (a released handle is never polled again, not even by the drain)."""
        still = []
        failed: TransferError | None = None
        for r in self.reads:
            try:
                if self.tr.poll(r.handle):
                    self._on_done(r.chunk)
                    continue
            except TransferError as e:  # finished with an error: writes nothing more, its handle is released
                failed = failed or e
                continue
            still.append(r)
        changed = len(still) != len(self.reads)
        self.reads = still
        if failed is not None:
            raise failed
        return changed

    async def drive(self, feed: Feed, more: Callable[[], bool], stall_timeout: float, deadline: float) -> None:
        """Post READs through `feed` while `more()`, and poll until none is left in flight.

        Raises SourceFailed when neither a post nor a completion happened for `stall_timeout`, or past `deadline`
        (monotonic); TransferError when a READ failed."""
        last = time.monotonic()
        while more() or self.reads:
            progressed = self.poll()
            posted = await feed() if more() else False
            now = time.monotonic()
            if posted or progressed:
                last = now
            elif now - last > stall_timeout:
                raise SourceFailed("transfer made no progress")
            if now > deadline:
                raise SourceFailed("transfer timed out")
            if not posted:
                await asyncio.sleep(BUSY_POLL_S)  # tight only while READs are in flight

    async def drain(self, timeout: float) -> bool:
        """True once no READ is in flight (each finished or failed); False if that cannot be confirmed in time."""
        end = time.monotonic() + timeout
        try:  # tests: `drain=sleep:S` stands for READs that take S seconds to confirm, `drain=raise` for never
            await self._fp.ahit("drain")
        except RuntimeError:
            return False
        if time.monotonic() > end:
            return False
        while self.reads:
            still = []
            for r in self.reads:
                try:
                    if not self.tr.poll(r.handle):
                        still.append(r)
                except TransferError:
                    pass  # failed: it writes nothing more
            self.reads = still
            if self.reads and time.monotonic() > end:
                return False
            if self.reads:
                await asyncio.sleep(0.001)
        return True
