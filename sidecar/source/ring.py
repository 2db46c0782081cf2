"""The source's staging ring: a few sidecar-owned, NIXL-registered slots, and the carousel that feeds them.

UCX cannot re-export memory this process imported with cudaIpcOpenMemHandle: a READ of it ran at
0.45 GB/s (host TCP emulation) against 303 GB/s for a sidecar-owned buffer on 2x H200. So a GPU
source copies each chunk of engine memory into a slot (same-GPU D2D, ~2 TB/s) and targets READ the
slot; the copy of chunk k+1 overlaps the network read of chunk k.

One pass feeds every reader of the rank at once (`Carousel`, its schedule in sidecar.source.carousel): a slot is
filled once, announced to each reader in the pass, and reused once each of them reported its READ Done (the
READ carries a Done notification that NIXL delivers on completion) or was dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable

from sidecar.contract.codec import ProtocolError
from sidecar.contract.messages import TensorEntry
from sidecar.memory.regions import MemoryOps, Region
from sidecar.planner import Chunk, chunk_plan
from sidecar.source.carousel import CarouselSchedule

log = logging.getLogger("mx.serving")

Announce = Callable[[int, int], None]  # (chunk, slot): tell one reader a slot holds a chunk


class Straggler(TimeoutError):
    """Dropped from the pass: it held the other readers back for longer than MX_STRAGGLER_TIMEOUT."""


class StagingRing:
    def __init__(self, ops: MemoryOps, slots: int, slot_bytes: int) -> None:
        self.ops = ops
        self.slot_bytes = slot_bytes
        self.slots: list[Region] = [ops.alloc(slot_bytes) for _ in range(slots)]
        self.carousel: Carousel | None = None  # set by the publisher once the ring serves a rank

    @property
    def nbytes(self) -> int:
        return self.slot_bytes * len(self.slots)

    def copies(self, chunk: Chunk, slot: int, entry_addrs: list[int]) -> list[tuple[int, int, int]]:
        base = self.slots[slot].addr
        return [(base + p.slot_offset, entry_addrs[p.entry] + p.entry_offset, p.nbytes) for p in chunk.pieces]

    async def fill(self, chunk: Chunk, slot: int, entry_addrs: list[int]) -> None:
        # A worker thread: the copy (memcpy or a CUDA stream sync) must not stall the event loop.
        await asyncio.to_thread(self.ops.copy_many, self.copies(chunk, slot, entry_addrs))

    def close(self) -> None:
        if self.carousel is not None:
            self.carousel.close()
        for s in self.slots:
            s.close()


class Carousel:
    """Runs the schedule: one task fills slots while the pass has readers; readers join and leave at any time."""

    def __init__(self, ring: StagingRing, rank: int, tensors: list[TensorEntry], entry_addrs: list[int], *,
                 max_readers: int, straggler_timeout: float, stall_timeout: float) -> None:
        self._ring, self._rank, self._addrs = ring, rank, entry_addrs
        self._chunks = chunk_plan(tensors, ring.slot_bytes)
        self.schedule = CarouselSchedule(len(self._chunks), len(ring.slots), max_readers)
        self._straggler, self._stall = straggler_timeout, stall_timeout
        self._announce: dict[Hashable, Announce] = {}
        self._finished: dict[Hashable, asyncio.Future[None]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._blocked: tuple[int, float] | None = None  # (position, since when) the pass waits to refill
        self.fills = 0  # slot fills since the ring was made (one per position, whatever the readers)
        self.fill_bytes = 0
        self.fill_s = 0.0  # time in the staging copies: their rate is the ring's copy rate

    @property
    def readers(self) -> int:
        return len(self._finished)

    def join(self, key: Hashable, announce: Announce) -> asyncio.Future[None] | None:
        """The reader's future (done once it READ every chunk), or None: the pass is full."""
        if not self.schedule.join(key):
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.schedule.finished(key):  # nothing to read
            fut.set_result(None)
            return fut
        self._announce[key], self._finished[key] = announce, fut
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return fut

    def done(self, key: Hashable, chunk: int) -> None:
        if key not in self._finished:
            return  # dropped already; its late Done changes nothing
        try:
            last = self.schedule.done(key, chunk)
        except ValueError as e:
            self._end(key, ProtocolError(str(e)))
            return
        if last:
            self._end(key, None)
        self._changed.set()

    def leave(self, key: Hashable) -> None:
        self._end(key, ProtocolError("reader left the pass"))

    def _end(self, key: Hashable, error: BaseException | None) -> None:
        self.schedule.drop(key)
        self._announce.pop(key, None)
        fut = self._finished.pop(key, None)
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)
        self._changed.set()

    async def _run(self) -> None:
        t0, fills0, bytes0, copy0 = time.monotonic(), self.fills, self.fill_bytes, self.fill_s
        readers: set[Hashable] = set()
        try:
            while not self.schedule.idle():
                fill = self.schedule.next_fill()
                if fill is None:
                    await self._wait_for_readers()
                    continue
                t1 = time.monotonic()
                await self._ring.fill(self._chunks[fill.chunk], fill.slot, self._addrs)
                self.fill_s += time.monotonic() - t1
                self.fills += 1
                self.fill_bytes += self._chunks[fill.chunk].nbytes
                announced = self.schedule.filled(fill)
                readers.update(announced)
                for key in announced:
                    self._announce[key](fill.chunk, fill.slot)
        except Exception as e:  # a failed copy (or announce): every reader in the pass ends with it
            log.warning("rank %d: the staging pass failed: %s", self._rank, e)
            for key in list(self._finished):
                self._end(key, e)
        copied, copy_s = self.fill_bytes - bytes0, self.fill_s - copy0
        log.info("rank %d: staging pass of %d fills (%.3f GB) for %d readers in %.2fs, copies at %.1f GB/s",
                 self._rank, self.fills - fills0, copied / 1e9, len(readers), time.monotonic() - t0,
                 copied / 1e9 / max(copy_s, 1e-9))

    async def _wait_for_readers(self) -> None:
        """Until a Done, a join or a leave; a straggler that holds others back gets MX_STRAGGLER_TIMEOUT, a reader
        that only holds itself MX_STALL_TIMEOUT (as before the carousel)."""
        self._changed.clear()
        loop = asyncio.get_running_loop()
        if self._blocked is None or self._blocked[0] != self.schedule.cursor:
            self._blocked = (self.schedule.cursor, loop.time())  # counted from the first wait, not the last Done
        held_back = self.schedule.held_back()
        # Holding only itself: MX_STALL_TIMEOUT from its last sign of life, as before the carousel. Holding others:
        # MX_STRAGGLER_TIMEOUT from when the pass first waited for this slot, however many Dones trickle in.
        bound = self._straggler if held_back else self._stall
        deadline = (self._blocked[1] if held_back else loop.time()) + bound
        try:
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - loop.time()))
            return
        except TimeoutError:
            pass
        self._blocked = None
        blocking = self.schedule.blocking() or set(self._finished)
        for key in blocking:
            err: TimeoutError = Straggler() if held_back else TimeoutError()
            self._end(key, err)
        if held_back:
            log.warning("rank %d: dropped %d reader(s) that held %d others back for %.0fs", self._rank,
                        len(blocking), len(held_back), bound)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for key in list(self._finished):
            self._end(key, ProtocolError("the staging ring closed"))
