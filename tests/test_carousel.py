"""The carousel's schedule as a table (pure), and its driver on a real ring with real readers as asyncio tasks."""

from __future__ import annotations

import asyncio
import ctypes
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.contract.codec import ProtocolError
from sidecar.contract.messages import TensorEntry
from sidecar.memory.regions import CpuOps
from sidecar.source.carousel import CarouselSchedule, Fill
from sidecar.source.ring import Carousel, StagingRing, Straggler


def run_table(n: int, s: int, steps: list[str]) -> list[str]:
    """Drive a schedule by a script: `join A`, `done A 3`, `drop A`, `fill` (the next fill, or why none).
    Returns one line per step: what the schedule answered."""
    sch = CarouselSchedule(n, s, max_readers=3)
    out = []
    for step in steps:
        op, *args = step.split()
        if op == "join":
            out.append("joined" if sch.join(args[0]) else "full")
        elif op == "done":
            try:
                out.append("last" if sch.done(args[0], int(args[1])) else "ok")
            except ValueError:
                out.append("refused")
        elif op == "drop":
            sch.drop(args[0])
            out.append("dropped")
        elif op == "fill":
            f = sch.next_fill()
            if f is None:
                out.append(f"wait {''.join(sorted(map(str, sch.blocking()))) or '-'}")
            else:
                readers = sch.filled(f)
                out.append(f"chunk {f.chunk} slot {f.slot} -> {''.join(map(str, readers))}")
    return out


# n=3 chunks, s=2 slots. Each row: the steps and what the schedule must answer.
TABLE = [
    ("one reader reads every chunk once, a slot is refilled only after its Done",
     ["join A", "fill", "fill", "fill", "done A 0", "fill", "done A 1", "done A 2", "fill"],
     ["joined", "chunk 0 slot 0 -> A", "chunk 1 slot 1 -> A", "wait A", "ok", "chunk 2 slot 0 -> A", "ok", "last",
      "wait -"]),
    ("two readers in one pass share every fill",
     ["join A", "join B", "fill", "fill", "done A 0", "fill", "done B 0", "fill"],
     ["joined", "joined", "chunk 0 slot 0 -> AB", "chunk 1 slot 1 -> AB", "ok", "wait B", "ok",
      "chunk 2 slot 0 -> AB"]),
    ("a late joiner starts at the cursor and wraps round to the chunks it missed",
     ["join A", "fill", "join B", "fill", "done A 0", "fill", "done A 1", "done B 1", "fill", "done A 2",
      "done B 2", "fill"],
     ["joined", "chunk 0 slot 0 -> A", "joined", "chunk 1 slot 1 -> AB", "ok", "chunk 2 slot 0 -> AB", "ok", "ok",
      "chunk 0 slot 1 -> B", "last", "ok", "wait -"]),  # B needs no more fills: only its last Done
    ("a dropped straggler no longer holds the slot",
     ["join A", "join B", "fill", "fill", "done A 0", "fill", "drop B", "fill"],
     ["joined", "joined", "chunk 0 slot 0 -> AB", "chunk 1 slot 1 -> AB", "ok", "wait B", "dropped",
      "chunk 2 slot 0 -> A"]),
    ("a Done for a chunk never announced, or twice, is refused",
     ["join A", "fill", "done A 1", "done A 0", "done A 0", "done B 0"],
     ["joined", "chunk 0 slot 0 -> A", "refused", "ok", "refused", "refused"]),
    ("the pass holds at most its readers",
     ["join A", "join B", "join C", "join D", "drop A", "join D"],
     ["joined", "joined", "joined", "full", "dropped", "joined"]),
    ("no reader, no fill",
     ["fill", "join A", "drop A", "fill"],
     ["wait -", "joined", "dropped", "wait -"]),
]


@pytest.mark.parametrize(("why", "steps", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_the_carousel_schedule_answers_as_its_table_says(why: str, steps: list[str], expected: list[str]) -> None:
    assert run_table(3, 2, steps) == expected


def test_held_back_names_only_readers_that_the_blocked_fill_waits_for_without_owing_it() -> None:
    sch = CarouselSchedule(4, 1, max_readers=4)
    sch.join("A")
    sch.filled(Fill(0, 0, 0))
    assert sch.blocking() == {"A"} and sch.held_back() == set()  # A only holds itself: the stall timeout applies
    sch.join("B")
    assert sch.held_back() == {"B"}  # now A holds B back: the straggler bound applies


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 7), s=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_every_reader_that_stays_reads_each_chunk_exactly_once_whatever_the_interleaving(n: int, s: int,
                                                                                        seed: int) -> None:
    rng = random.Random(seed)
    sch = CarouselSchedule(n, s, max_readers=8)
    read: dict[str, list[int]] = {}
    owed: dict[str, list[int]] = {}
    slot_of: dict[int, int] = {}  # slot -> chunk it holds now
    for _ in range(400):
        op = rng.random()
        if op < 0.15 and len(read) < 8:
            k = f"r{len(read)}"
            sch.join(k)
            read[k], owed[k] = [], []
        elif op < 0.55:
            f = sch.next_fill()
            if f is not None:
                for k in sch.filled(f):
                    owed[k].append(f.chunk)
                slot_of[f.slot] = f.chunk
        else:
            busy = [k for k, o in owed.items() if o]
            if busy:
                k = rng.choice(busy)
                c = owed[k].pop(0)
                assert c in slot_of.values()  # what a reader READs is still in its slot
                read[k].append(c)
                sch.done(k, c)
    for k, chunks in read.items():
        assert len(chunks) == len(set(chunks))  # never a chunk twice
        if sch.finished(k):
            assert sorted(chunks) == list(range(n))


def _tensors(n: int, nbytes: int) -> list[TensorEntry]:
    return [TensorEntry(f"t{i}", "uint8", [nbytes], 0, i * nbytes, nbytes) for i in range(n)]


async def _reader(car: Carousel, key: str, entry_bytes: bytes, ring: StagingRing, chunks, *,  # type: ignore[no-untyped-def]
                  delay: float = 0.0, stop_after: int | None = None) -> bytes:
    """A reader as a task: copies each announced slot, then reports Done; returns the bytes it assembled."""
    got: dict[int, bytes] = {}
    q: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    fut = car.join(key, lambda c, s: q.put_nowait((c, s)))
    assert fut is not None
    while not fut.done():
        get = asyncio.ensure_future(q.get())
        await asyncio.wait([get, fut], return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            break
        c, slot = get.result()
        if stop_after is not None and len(got) >= stop_after:
            await fut  # stops reading and never says so: only the source's verdict on it ends this
        await asyncio.sleep(delay)
        got[c] = ctypes.string_at(ring.slots[slot].addr, chunks[c].nbytes)
        car.done(key, c)
    await fut
    return b"".join(got[i] for i in range(len(chunks)))


def _ring_with(data: bytes, slots: int, slot_bytes: int) -> tuple[StagingRing, list[TensorEntry], list[int], object]:
    ops = CpuOps()
    src = ops.alloc(len(data))
    ctypes.memmove(src.addr, data, len(data))
    ring = StagingRing(ops, slots, slot_bytes)
    tensors = _tensors(len(data) // slot_bytes, slot_bytes)
    return ring, tensors, [src.addr + t.offset for t in tensors], src


def test_four_readers_of_one_pass_each_assemble_the_rank_and_the_ring_is_filled_once_per_position() -> None:
    async def go() -> None:
        data = random.Random(1).randbytes(16 * 4096)
        ring, tensors, addrs, _src = _ring_with(data, 2, 4096)
        car = Carousel(ring, 0, tensors, addrs, max_readers=8, straggler_timeout=5, stall_timeout=5)
        chunks = car._chunks
        outs = await asyncio.gather(*(_reader(car, f"r{i}", data, ring, chunks) for i in range(4)))
        assert all(o == data for o in outs)
        assert car.fills == 16  # one pass for all four, not four passes
        ring.close()

    asyncio.run(go())


def test_a_late_joiner_wraps_round_and_still_assembles_every_byte() -> None:
    async def go() -> None:
        data = random.Random(2).randbytes(12 * 4096)
        ring, tensors, addrs, _src = _ring_with(data, 3, 4096)
        car = Carousel(ring, 0, tensors, addrs, max_readers=8, straggler_timeout=5, stall_timeout=5)
        first = asyncio.ensure_future(_reader(car, "early", data, ring, car._chunks, delay=0.005))
        await asyncio.sleep(0.03)
        assert car.schedule.cursor > 0
        late = await _reader(car, "late", data, ring, car._chunks)
        assert late == data and await first == data
        assert car.fills < 24  # the late joiner shared the fills it was in time for
        ring.close()

    asyncio.run(go())


def test_a_reader_that_stops_mid_pass_is_dropped_after_the_straggler_bound_and_the_others_finish() -> None:
    async def go() -> None:
        data = random.Random(3).randbytes(10 * 4096)
        ring, tensors, addrs, _src = _ring_with(data, 2, 4096)
        car = Carousel(ring, 0, tensors, addrs, max_readers=8, straggler_timeout=0.3, stall_timeout=30)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        stuck = asyncio.ensure_future(_reader(car, "stuck", data, ring, car._chunks, stop_after=3))
        others = [asyncio.ensure_future(_reader(car, f"r{i}", data, ring, car._chunks)) for i in range(3)]
        assert [await o for o in others] == [data] * 3
        assert loop.time() - t0 < 0.3 * 3 + 1  # held back once by the bound, not by the stall timeout
        with pytest.raises(Straggler):
            await stuck
        ring.close()

    asyncio.run(go())


def test_a_reader_alone_that_stalls_gets_the_stall_timeout_not_the_straggler_bound() -> None:
    async def go() -> None:
        data = random.Random(4).randbytes(6 * 4096)
        ring, tensors, addrs, _src = _ring_with(data, 2, 4096)
        car = Carousel(ring, 0, tensors, addrs, max_readers=8, straggler_timeout=0.05, stall_timeout=0.6)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError) as e:
            await _reader(car, "alone", data, ring, car._chunks, stop_after=2)
        assert not isinstance(e.value, Straggler) and loop.time() - t0 >= 0.55
        ring.close()

    asyncio.run(go())


def test_a_full_pass_refuses_a_reader_and_a_done_never_announced_ends_only_that_reader() -> None:
    async def go() -> None:
        data = bytes(4 * 4096)
        ring, tensors, addrs, _src = _ring_with(data, 2, 4096)
        car = Carousel(ring, 0, tensors, addrs, max_readers=1, straggler_timeout=1, stall_timeout=1)
        fut = car.join("a", lambda c, s: None)
        assert fut is not None and car.join("b", lambda c, s: None) is None
        car.done("a", 3)  # chunk 3 was never announced to it
        with pytest.raises(ProtocolError):
            await fut
        assert car.join("b", lambda c, s: None) is not None
        car.close()
        ring.close()

    asyncio.run(go())
