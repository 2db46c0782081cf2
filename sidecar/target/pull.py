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
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.messages import PROTOCOL_VERSION, Bye, Done, Hello, RankSource, Ready, Welcome, encode
from sidecar.errors import FenceError, PlanError, SourceFailed, Superseded, TransferError, VerifyError
from sidecar.failpoints import Failpoints
from sidecar.logs import Ctx
from sidecar.memory.rank_memory import RankMemory
from sidecar.metrics import Metrics
from sidecar.peers import PeerRouter
from sidecar.planner import Chunk, check_entries_match, chunk_plan, descriptors
from sidecar.transport import Transport

DIRECT_WINDOW = 4  # READs in flight in direct mode; staged mode is bounded by the source's slots
MAX_CHUNKS = 1_000_000  # a target's cap, tighter than the planner's default; the planner refuses before building






Guard = Callable[[], str]  # '' while this session may write the rank, else why not


class StreamingVerifier:
    """Checksums entries in a worker thread as soon as their last byte landed, while later chunks still stream.

    Measured on 2x H200: checksumming 9.65 GiB after the transfer took 0.23 s, twice the transfer itself; one
    launch per tensor cost 0.14 s of it for 1011 tensors, one batched launch per chunk 0.02 s (docs/VLLM.md).
    Entries are only read here once complete and never written again by this attempt, so the overlap is safe.
    """

    def __init__(self, rank: RankMemory) -> None:
        self._rank = rank
        self._left = [e.nbytes for e in rank.manifest.tensors]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"mx-verify-{rank.rank}")
        self._futs: dict[int, tuple[Future[list[str]], int]] = {}

    def chunk_done(self, chunk: Chunk) -> None:
        done = []
        for p in chunk.pieces:
            self._left[p.entry] -= p.nbytes
            if self._left[p.entry] == 0:
                done.append(p.entry)
        if done:
            self._submit(done)

    def _submit(self, idx: list[int]) -> None:
        tensors, addrs = self._rank.manifest.tensors, self._rank.entry_addrs
        fut = self._pool.submit(self._rank.ops.checksum_many, [(addrs[i], tensors[i].nbytes) for i in idx])
        for k, i in enumerate(idx):
            self._futs[i] = (fut, k)

    async def results(self) -> list[str]:
        rest = [i for i in range(len(self._left)) if i not in self._futs]  # zero-byte entries (no chunk names them)
        if rest:
            self._submit(rest)
        try:
            out = []
            for i in range(len(self._left)):
                fut, k = self._futs[i]
                out.append((await asyncio.wrap_future(fut))[k])
            return out
        finally:
            self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
    try:
        peer = tr.add_peer(src_metadata, src.agent)
    except ValueError as e:
        raise PlanError(str(e)) from None
    except TransferError as e:
        raise SourceFailed(str(e)) from e
    session = uuid.uuid4().hex
    inbox = router.open(session, peer)
    total = rank.manifest.total_bytes
    moved = 0
    t0 = time.monotonic()
    verifier = StreamingVerifier(rank)
    inflight: list[tuple[Any, Chunk]] = []
    reads = _Reads(tr, peer, src.mem_type, inflight, guard, failpoints)
    progress = _Progress(log, rank.rank, total, t0, verifier.chunk_done)
    ok = False
    try:
        with tr.busy():
            tr.send(peer, encode(keys.sign_msg("peer", Hello(PROTOCOL_VERSION, session, rank.rank, tr.name,
                                                             rank.manifest.layout_digest, time.time()))))
            welcome = await _next(inbox, cfg.stall_timeout, "Welcome")
            if not isinstance(welcome, Welcome) or not welcome.ok:
                raise SourceFailed(f"source refused: {getattr(welcome, 'error', welcome)}")
            deadline = t0 + cfg.transfer_timeout
            if src.mode == "staged":
                slot_bytes = {n for _, n in src.slots}
                if len(slot_bytes) != 1:
                    raise PlanError("source slots of unequal size")
                chunks = chunk_plan(rank.manifest.tensors, slot_bytes.pop(), MAX_CHUNKS)
                moved = await _staged(cfg, reads, session, src, rank, chunks, inbox, progress, deadline, keys)
            else:
                chunks = chunk_plan(rank.manifest.tensors, cfg.staging_slot_bytes, MAX_CHUNKS)
                moved = await _direct(cfg, reads, src, rank, chunks, progress, deadline)
        ok = True
    except TransferError as e:
        raise SourceFailed(str(e)) from e
    except TimeoutError as e:
        raise SourceFailed(f"source stalled for {cfg.stall_timeout:.0f}s") from e
    finally:
        if not ok:
            verifier.close()
        # Never leave a READ in flight: it could land after a fallback wrote these tensors from storage.
        drained = await _drain(tr, inflight, cfg.stall_timeout, failpoints)
        router.close(session)
        try:
            tr.send(peer, encode(keys.sign_msg("peer", Bye(PROTOCOL_VERSION, session, moved == total))))
        except Exception as e:  # the source may be dead already; that is why we are leaving
            log.debug("bye not sent: %s", e, rank=rank.rank)
        if not drained:
            tr.disconnect(peer)  # best effort; only the process exit is proof
            raise FenceError(f"rank {rank.rank}: {len(inflight)} READs still in flight after "
                             f"{cfg.stall_timeout:.0f}s")
        tr.remove_peer(peer)
    if moved != total:
        verifier.close()
        raise VerifyError(f"moved {moved} of {total} bytes")
    t_end = time.monotonic()
    dt = t_end - t0
    setup = (progress.t_first or t_end) - t0
    stream = moved / 1e9 / max(t_end - (progress.t_first or t0), 1e-9)
    metrics.transfer_bytes.labels(log.extra["model"], str(rank.rank), "target").inc(moved)  # type: ignore[index]
    # "setup" is Hello -> first READ (source attaches to us, first slot filled); "stream" the READs after it.
    log.info("phase=transfer %.2f GB in %.3fs (%.2f GB/s, %s; setup %.3fs, stream %.2f GB/s)", moved / 1e9, dt,
             moved / 1e9 / max(dt, 1e-9), src.mode, setup, stream, rank=rank.rank, peer=src.agent)
    return moved, verifier


class _Reads:
    """Posts READs into engine memory, each only after the rank's guard allowed it."""

    def __init__(self, tr: Transport, peer: str, mem_type: str, inflight: list[tuple[Any, Chunk]], guard: Guard,
                 failpoints: Failpoints) -> None:
        self.tr, self.peer, self._mem_type, self.inflight = tr, peer, mem_type, inflight
        self._guard, self._fp = guard, failpoints

    async def post(self, chunk: Chunk, local: Any, remote: Any, notif: bytes = b"") -> None:
        await self._fp.ahit("before_read")
        why = self._guard()
        if why:
            raise Superseded(why)
        self.inflight.append((self.tr.start_read(local, remote, self.peer, self._mem_type, notif), chunk))


async def verify_rank(rank: RankMemory, src: RankSource, verifier: StreamingVerifier, log: Ctx) -> None:
    """Every entry's checksum must equal the source's (signed) one: this, not "the READ completed", releases."""
    if len(src.checksums) != len(rank.manifest.tensors):
        verifier.close()
        raise VerifyError("the source published no checksum for some entries")
    t0 = time.monotonic()
    mine = await verifier.results()  # mostly computed already, while the transfer streamed
    bad = [e.name for e, a, b in zip(rank.manifest.tensors, mine, src.checksums, strict=True) if a != b]
    if bad:
        raise VerifyError(f"{len(bad)} tensors differ from the source, e.g. {bad[:3]}")
    rank.checksums = mine
    log.info("phase=verify %d checksums match, %.3fs after the last byte", len(mine), time.monotonic() - t0,
             rank=rank.rank)


async def _next(inbox: asyncio.Queue[Welcome | Ready], timeout: float, what: str) -> Welcome | Ready:
    try:
        return await asyncio.wait_for(inbox.get(), timeout)
    except TimeoutError:
        raise SourceFailed(f"no {what} from the source within {timeout:.0f}s") from None


async def _wait_all(reads: _Reads, keep: int, cfg: Config, progress: _Progress, deadline: float) -> None:
    """Drive in-flight READs until at most `keep` remain."""
    last = time.monotonic()
    inflight = reads.inflight
    while len(inflight) > keep:
        if _poll_once(reads.tr, inflight, progress):
            last = time.monotonic()
        if len(inflight) > keep:
            now = time.monotonic()
            if now - last > cfg.stall_timeout or now > deadline:
                raise SourceFailed("transfer made no progress" if now <= deadline else "transfer timed out")
            await asyncio.sleep(0.0002)


async def _drain(tr: Transport, inflight: list[tuple[Any, Chunk]], timeout: float, failpoints: Failpoints) -> bool:
    """True once no READ is in flight (each finished or failed); False if that cannot be confirmed in time."""
    try:
        failpoints.hit("drain")
    except RuntimeError:
        return False
    end = time.monotonic() + timeout
    while inflight:
        still = []
        for h, c in inflight:
            try:
                if not tr.poll(h):
                    still.append((h, c))
            except TransferError:
                pass  # failed: it writes nothing more
        inflight[:] = still
        if inflight and time.monotonic() > end:
            return False
        if inflight:
            await asyncio.sleep(0.001)
    return True


async def _direct(cfg: Config, reads: _Reads, src: RankSource, rank: RankMemory, chunks: list[Chunk],
                  progress: _Progress, deadline: float) -> int:
    for chunk in chunks:
        local, remote = descriptors(chunk, rank.entry_addrs, rank.device_id, src.entry_addrs, src.device_id)
        progress.started()
        await reads.post(chunk, local, remote)
        await _wait_all(reads, DIRECT_WINDOW - 1, cfg, progress, deadline)
    await _wait_all(reads, 0, cfg, progress, deadline)
    return progress.done


async def _staged(cfg: Config, reads: _Reads, session: str, src: RankSource, rank: RankMemory,
                  chunks: list[Chunk], inbox: asyncio.Queue[Welcome | Ready], progress: _Progress,
                  deadline: float, keys: Keyring) -> int:
    expected = 0
    last = time.monotonic()
    inflight = reads.inflight
    while expected < len(chunks) or inflight:
        before = progress.done
        _poll_once(reads.tr, inflight, progress)
        msg: Welcome | Ready | None = None
        if expected < len(chunks):
            if inflight:
                msg = None if inbox.empty() else inbox.get_nowait()
            else:  # nothing to drive: sleep until the source announces the next slot
                msg = await _next(inbox, cfg.stall_timeout, f"Ready for chunk {expected}")
        if msg is not None:
            if not isinstance(msg, Ready) or msg.chunk != expected or not (0 <= msg.slot < len(src.slots)):
                raise SourceFailed(f"unexpected message from the source: {msg}")
            slot_addr, _ = src.slots[msg.slot]
            local, remote = descriptors(chunks[expected], rank.entry_addrs, rank.device_id, slot_addr,
                                        src.device_id)
            done = encode(keys.sign_msg("peer", Done(PROTOCOL_VERSION, session, expected)))
            progress.started()
            await reads.post(chunks[expected], local, remote, done)
            expected += 1
        now = time.monotonic()
        if msg is not None or progress.done != before:
            last = now
        elif now - last > cfg.stall_timeout:
            raise SourceFailed("transfer made no progress")
        if now > deadline:
            raise SourceFailed("transfer timed out")
        if msg is None:
            await asyncio.sleep(0.0002)  # tight only while READs are in flight
    return progress.done


def _poll_once(tr: Transport, inflight: list[tuple[Any, Chunk]], progress: _Progress) -> bool:
    still = []
    failed: TransferError | None = None
    for h, c in inflight:
        try:
            if tr.poll(h):
                progress.add(c)
                continue
        except TransferError as e:  # finished with an error: writes nothing more, its handle is released
            failed = failed or e
            continue
        still.append((h, c))
    changed = len(still) != len(inflight)
    inflight[:] = still  # released handles never stay listed: the drain must not poll them again
    if failed is not None:
        raise failed
    return changed


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
