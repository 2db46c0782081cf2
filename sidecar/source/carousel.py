"""The carousel: one staging pass of a rank feeds every reader in it (pure schedule, no I/O, no clock).

Before, a staged source served one reader per rank at a time (the ring's lock): N targets started at once took
about N transfers, and queued ones gave up after MX_STALL_TIMEOUT and read storage. Now the ring is filled once
per position and every reader in the pass READs it before the slot is refilled.

Positions are absolute (0, 1, 2, ...): position p holds chunk p % n in slot p % s. A reader joins at the cursor
(the next position to fill) and needs the n consecutive positions from there: a late joiner starts on the next
fill and wraps around to the chunks it missed, it never waits for a new pass. A slot is refilled only once every
reader it was announced to has reported Done for it, or was dropped (the driver drops a straggler that holds the
others back for longer than its bound; see sidecar.source.ring).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fill:
    position: int
    chunk: int
    slot: int


@dataclass
class _Reader:
    start: int  # its first position
    owed: dict[int, int] = field(default_factory=dict)  # chunk announced, READ not yet Done -> its position
    done: int = 0


class CarouselSchedule:
    def __init__(self, nchunks: int, nslots: int, max_readers: int) -> None:
        if nchunks < 0 or nslots < 1 or max_readers < 1:
            raise ValueError("a carousel needs chunks >= 0, slots >= 1 and room for one reader")
        self.n, self.s, self.max_readers = nchunks, nslots, max_readers
        self.cursor = 0
        self._readers: dict[Hashable, _Reader] = {}
        self._owers: list[set[Hashable]] = [set() for _ in range(nslots)]  # who still READs the slot's chunk

    # ------------------------------------------------------------------ readers
    @property
    def readers(self) -> list[Hashable]:
        return list(self._readers)

    def join(self, key: Hashable) -> bool:
        """False: the pass is full (the reader is told it is busy and looks for another source)."""
        if key in self._readers:
            raise ValueError(f"reader {key!r} is already in the pass")
        if len(self._readers) >= self.max_readers:
            return False
        if self.n:  # a rank of no bytes has nothing to read: the reader is done at once
            self._readers[key] = _Reader(self.cursor)
        return True

    def drop(self, key: Hashable) -> None:
        """The reader left or was dropped: what it still owed no longer holds a slot."""
        if self._readers.pop(key, None) is not None:
            for owers in self._owers:
                owers.discard(key)

    def done(self, key: Hashable, chunk: int) -> bool:
        """The reader's READ of `chunk` completed. True when that was its last chunk (it has left the pass).

        Raises ValueError for a Done of a chunk not announced to it (or already done): a confused or lying peer."""
        r = self._readers.get(key)
        if r is None or chunk not in r.owed:
            raise ValueError(f"Done for chunk {chunk} that was not announced to this reader (or already done)")
        pos = r.owed.pop(chunk)
        self._owers[pos % self.s].discard(key)
        r.done += 1
        if r.done == self.n:
            del self._readers[key]
            return True
        return False

    def finished(self, key: Hashable) -> bool:
        return key not in self._readers

    # ------------------------------------------------------------------ the pass
    def _needs(self, r: _Reader, pos: int) -> bool:
        return r.start <= pos < r.start + self.n

    def next_fill(self) -> Fill | None:
        """The next position to fill, or None: its slot is still being read (`blocking()` says by whom) or no
        reader needs it (the pass is idle until one joins)."""
        pos, slot = self.cursor, self.cursor % self.s
        if self._owers[slot] or not any(self._needs(r, pos) for r in self._readers.values()):
            return None
        return Fill(pos, pos % self.n, slot)

    def filled(self, fill: Fill) -> tuple[Hashable, ...]:
        """The slot holds the fill's chunk now: the readers to announce it to (in join order), each owing a Done.

        Taken now, not when the fill started: a reader that joined while the slot was being copied starts at this
        position and must be told of it (else it would wait for a chunk that comes round never)."""
        if fill.position != self.cursor:
            raise ValueError("fills happen in order")
        readers = tuple(k for k, r in self._readers.items() if self._needs(r, fill.position))
        self._owers[fill.slot] = set(readers)
        for k in readers:
            self._readers[k].owed[fill.chunk] = fill.position
        self.cursor += 1
        return readers

    def blocking(self) -> set[Hashable]:
        """The readers whose Done the next fill waits for (empty when it waits for nobody)."""
        return set(self._owers[self.cursor % self.s])

    def held_back(self) -> set[Hashable]:
        """Readers that need the next fill and are not among those it waits for: a straggler's bound applies only
        when someone else pays for its slowness."""
        blocking = self.blocking()
        return {k for k, r in self._readers.items() if k not in blocking and self._needs(r, self.cursor)}

    def idle(self) -> bool:
        return not self._readers
