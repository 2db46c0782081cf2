"""The target side: READ one rank from one source straight into engine memory, then verify.

Local descriptors come only from this rank's own manifest (validated against its own handles), so a
bad record in Redis or a lying peer can make a transfer fail but never write outside our tensors.

Fencing: an attempt ends only when no READ into engine memory is in flight. Before every READ the
rank's guard is asked (is the rank still `receiving` under our session, is our lease on it fresh?).
When the attempt ends, in-flight READs are drained; a drain that cannot be confirmed raises FenceError
and the daemon exits with the engine blocked (NIXL cannot confirm a cancel: `releaseXferReq` and
`remove_remote_agent` drop its bookkeeping without waiting for UCX; process exit does end them).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.codec import PROTOCOL_VERSION, encode
from sidecar.contract.messages import Bye, Done, Hello, RankSource, Ready, Welcome
from sidecar.errors import FenceError, PlanError, SourceBusy, SourceFailed, TransferError, VerifyError
from sidecar.failpoints import Failpoints
from sidecar.inflight import Guard, Inflight
from sidecar.logs import Ctx
from sidecar.memory.rank_memory import RankMemory
from sidecar.metrics import Metrics
from sidecar.peers import PeerRouter
from sidecar.planner import Chunk, Plan, check_entries_match, make_plan
from sidecar.target.verify import StreamingVerifier
from sidecar.transport import Transport

__all__ = ["DIRECT_WINDOW", "MAX_CHUNKS", "Guard", "StreamingVerifier", "pull_rank"]

DIRECT_WINDOW = 4  # READs in flight in direct mode; staged mode is bounded by the source's slots
MAX_CHUNKS = 1_000_000  # a target's cap, tighter than the planner's default; the planner refuses before building


async def pull_rank(
    cfg: Config,
    rank: RankMemory,
    src: RankSource,
    src_metadata: bytes,
    router: PeerRouter,
    metrics: Metrics,
    log: Ctx,
    keys: Keyring,
    guard: Guard,
    failpoints: Failpoints,
) -> tuple[int, StreamingVerifier]:
    """Move every byte of `rank` from `src`; returns bytes moved and the running checksums.

    Raises SourceFailed/VerifyError/PlanError/Superseded, or FenceError when it cannot prove that no READ is left
    in flight."""
    tr = rank.transport
    assert tr is not None
    check_entries_match(src.entries, rank.manifest)  # before any byte moves
    if src.mem_type not in ("DRAM", "VRAM"):
        raise PlanError(f"unknown source memory type {src.mem_type!r}")
    peer = _add_peer(tr, src_metadata, src.agent)
    session = uuid.uuid4().hex
    inbox = router.open(session, peer)
    total = rank.manifest.total_bytes
    moved = 0
    t0 = time.monotonic()
    verifier = StreamingVerifier(rank)
    progress = _Progress(log, rank.rank, total, t0, verifier.chunk_done)
    reads = Inflight(tr, peer, src.mem_type, guard, failpoints, progress.add)
    ok = False
    try:
        with tr.busy():
            tr.send(peer, encode(keys.sign_msg("peer", Hello(PROTOCOL_VERSION, session, rank.rank, tr.name,
                                                             rank.manifest.layout_digest, time.time()))))
            welcome = await _next(inbox, cfg.stall_timeout, "Welcome")
            if isinstance(welcome, Welcome) and not welcome.ok and welcome.error.startswith("busy:"):
                raise SourceBusy(f"source busy ({welcome.error[5:].strip()})")
            if not isinstance(welcome, Welcome) or not welcome.ok:
                raise SourceFailed(f"source refused: {getattr(welcome, 'error', welcome)}")
            deadline = t0 + cfg.transfer_timeout
            plan = _plan(cfg, rank, src)  # every READ computed and bounds-checked before the first is posted
            if src.mode == "staged":
                moved = await _staged(cfg, reads, session, src, plan, inbox, progress, deadline, keys, log,
                                      rank.rank)
            else:
                moved = await _direct(cfg, reads, plan, inbox, progress, deadline)
        ok = True
    except TransferError as e:
        raise SourceFailed(str(e)) from e
    except TimeoutError as e:
        raise SourceFailed(f"source stalled for {cfg.stall_timeout:.0f}s") from e
    finally:
        if not ok:
            verifier.close()
        await _end(cfg, reads, router, session, keys, log, rank.rank, moved == total)
    if moved != total:
        verifier.close()
        raise VerifyError(f"moved {moved} of {total} bytes")
    _report(metrics, log, rank.rank, src, moved, t0, progress.t_first)
    return moved, verifier


def _add_peer(tr: Transport, metadata: bytes, agent: str) -> str:
    try:
        return tr.add_peer(metadata, agent)
    except ValueError as e:
        raise PlanError(str(e)) from None
    except TransferError as e:
        raise SourceFailed(str(e)) from e


def _plan(cfg: Config, rank: RankMemory, src: RankSource) -> Plan:
    if src.mode == "staged":
        slot_bytes = {n for _, n in src.slots}
        if len(slot_bytes) != 1:
            raise PlanError("source slots of unequal size")
        return make_plan(rank.manifest.tensors, rank.entry_addrs, rank.device_id, None, src.device_id,
                         slot_bytes.pop(), MAX_CHUNKS)
    return make_plan(rank.manifest.tensors, rank.entry_addrs, rank.device_id, src.entry_addrs, src.device_id,
                     cfg.staging_slot_bytes, MAX_CHUNKS)


async def _end(cfg: Config, reads: Inflight, router: PeerRouter, session: str, keys: Keyring, log: Ctx,
               rank: int, complete: bool) -> None:
    """The fence: never leave a READ in flight, it could land after a fallback wrote these tensors from storage.

    A cancellation (SIGTERM, a sibling rank failed) does not cut the drain short: it waits for the drain's own
    bound, then goes on. (Measured before: the daemon's cancel ended the drain after ~1 s and sent `abort` while
    READs could still land.)"""
    tr, peer = reads.tr, reads.peer
    drain = asyncio.ensure_future(reads.drain(cfg.stall_timeout))
    cancelled = False
    while True:
        try:
            drained = await asyncio.shield(drain)
            break
        except asyncio.CancelledError:
            cancelled = True
            if drain.done():
                drained = drain.result()
                break
    router.close(session)
    try:
        tr.send(peer, encode(keys.sign_msg("peer", Bye(PROTOCOL_VERSION, session, complete))))
    except Exception as e:  # the source may be dead already; that is why we are leaving
        log.debug("bye not sent: %s", e, rank=rank)
    if not drained:
        tr.disconnect(peer)  # best effort; only the process exit is proof
        raise FenceError(f"rank {rank}: {len(reads)} READs still in flight after {cfg.stall_timeout:.0f}s")
    tr.remove_peer(peer)
    if cancelled:
        raise asyncio.CancelledError


def _report(metrics: Metrics, log: Ctx, rank: int, src: RankSource, moved: int, t0: float,
            t_first: float | None) -> None:
    t_end = time.monotonic()
    dt = t_end - t0
    setup = (t_first or t_end) - t0
    stream = moved / 1e9 / max(t_end - (t_first or t0), 1e-9)
    metrics.transfer_bytes.labels(log.extra["model"], str(rank), "target").inc(moved)  # type: ignore[index]
    # "setup" is Hello -> first READ (source attaches to us, first slot filled); "stream" the READs after it.
    log.info("phase=transfer %.2f GB in %.3fs (%.2f GB/s, %s; setup %.3fs, stream %.2f GB/s)", moved / 1e9, dt,
             moved / 1e9 / max(dt, 1e-9), src.mode, setup, stream, rank=rank, peer=src.agent)


async def _next(inbox: asyncio.Queue[Welcome | Ready | Bye], timeout: float, what: str) -> Welcome | Ready:
    try:
        return _unless_bye(await asyncio.wait_for(inbox.get(), timeout))
    except TimeoutError:
        raise SourceFailed(f"no {what} from the source within {timeout:.0f}s") from None


def _unless_bye(msg: Welcome | Ready | Bye) -> Welcome | Ready:
    if isinstance(msg, Bye):  # it withdrew (its engine changed, it stops): at once, not after a stall timeout
        raise SourceFailed("the source withdrew from this session (Bye)")
    return msg


def _withdrawn(inbox: asyncio.Queue[Welcome | Ready | Bye]) -> None:
    """Direct mode reads no message during the transfer: a Bye waiting in the inbox ends it."""
    if not inbox.empty():
        msg = inbox.get_nowait()
        _unless_bye(msg)
        raise SourceFailed(f"unexpected message from the source: {msg}")


async def _direct(cfg: Config, reads: Inflight, plan: Plan, inbox: asyncio.Queue[Welcome | Ready | Bye],
                  progress: _Progress, deadline: float) -> int:
    """READ straight from the source's engine memory, DIRECT_WINDOW at a time."""
    nxt = 0

    async def feed() -> bool:
        nonlocal nxt
        _withdrawn(inbox)
        if len(reads) >= DIRECT_WINDOW:
            return False
        local, remote = plan.descriptors(nxt)
        progress.started()
        await reads.post(plan.chunks[nxt], local, remote)
        nxt += 1
        return True

    await reads.drive(feed, lambda: nxt < len(plan.chunks), cfg.stall_timeout, deadline)
    return progress.done


async def _staged(cfg: Config, reads: Inflight, session: str, src: RankSource, plan: Plan,
                  inbox: asyncio.Queue[Welcome | Ready | Bye], progress: _Progress, deadline: float,
                  keys: Keyring, log: Ctx, rank: int) -> int:
    """READ each chunk from the slot the source announced it in; the READ's notification frees the slot.

    The source's pass may be under way when we join (a carousel, sidecar.source.carousel): the first Ready names
    where we start, and the chunks come in order from there, wrapping round to the ones before it."""
    n = len(plan.chunks)
    start: int | None = None
    got = 0

    async def feed() -> bool:
        nonlocal start, got
        expected = "any" if start is None else (start + got) % n
        if reads.reads:
            msg = None if inbox.empty() else inbox.get_nowait()
        else:  # nothing to drive: sleep until the source announces the next slot
            msg = await _next(inbox, cfg.stall_timeout, f"Ready for chunk {expected}")
        if msg is None:
            return False
        msg = _unless_bye(msg)
        if (not isinstance(msg, Ready) or not (0 <= msg.slot < len(src.slots)) or not 0 <= msg.chunk < n
                or (start is not None and msg.chunk != expected)):
            raise SourceFailed(f"unexpected message from the source: {msg}")
        if start is None:
            start = msg.chunk
            log.info("joined the source's pass at chunk %d of %d", start, n, rank=rank)
        local, remote = plan.descriptors(msg.chunk, src.slots[msg.slot][0])
        done = encode(keys.sign_msg("peer", Done(PROTOCOL_VERSION, session, msg.chunk)))
        progress.started()
        await reads.post(plan.chunks[msg.chunk], local, remote, done)
        got += 1
        return True

    await reads.drive(feed, lambda: got < n, cfg.stall_timeout, deadline)
    return progress.done


class _Progress:
    """Logs percent and GB/s every 2 s or 25%, whichever comes first."""

    def __init__(self, log: Ctx, rank: int, total: int, t0: float,
                 on_chunk: Callable[[Chunk], None] | None = None) -> None:
        self._log, self._rank, self._total, self._t0 = log, rank, total, t0
        self._on_chunk = on_chunk
        self.done = 0
        self.t_first: float | None = None
        self._last_t = t0
        self._last_pct = 0.0

    def started(self) -> None:
        if self.t_first is None:
            self.t_first = time.monotonic()

    def add(self, chunk: Chunk) -> None:
        if self._on_chunk is not None:
            self._on_chunk(chunk)
        n = chunk.nbytes
        self.done += n
        now = time.monotonic()
        pct = 100.0 * self.done / max(self._total, 1)
        if now - self._last_t >= 2.0 or pct - self._last_pct >= 25.0 or self.done == self._total:
            gbps = self.done / 1e9 / max(now - self._t0, 1e-9)
            self._log.info("progress %.0f%% (%.2f/%.2f GB, %.2f GB/s)", pct, self.done / 1e9, self._total / 1e9,
                           gbps, rank=self._rank)
            self._last_t, self._last_pct = now, pct
