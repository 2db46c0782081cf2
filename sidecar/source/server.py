"""The source side: answers readers' Hello, feeds the staging ring, tracks sessions.

A reader (target sidecar) sends Hello over a NIXL notification. The source looks up the reader's
agent metadata in Redis (bounded size), checks the layout digest, answers Welcome, and then either
(direct) stays attentive while the reader READs engine memory, or (staged) fills slot after slot,
announcing each with Ready and reusing a slot only after the reader's READ of it completed (the
READ carries a Done notification that NIXL delivers on completion).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.messages import (
    MAX_HELLO_AGE_S,
    PROTOCOL_VERSION,
    Bye,
    Done,
    Hello,
    ProtocolError,
    Ready,
    Welcome,
    encode,
)
from sidecar.coordinator import Coordinator
from sidecar.errors import CoordinatorUnavailable
from sidecar.memory.rank_memory import RankMemory
from sidecar.metrics import Metrics
from sidecar.planner import chunk_plan
from sidecar.transport import Transport

log = logging.getLogger("mx.serving")


@dataclass
class _Session:
    hello: Hello
    peer: str
    done: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    bye: asyncio.Event = field(default_factory=asyncio.Event)


class SourceServer:
    def __init__(self, cfg: Config, model: str, coordinator: Coordinator | None, metrics: Metrics,
                 keys: Keyring) -> None:
        self._cfg = cfg
        self.model = model
        self._coord = coordinator
        self._m = metrics
        self._keys = keys
        self._ranks: dict[int, RankMemory] = {}
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: dict[str, float] = {}  # Hello session ids seen recently -> expiry (replay protection)

    def serve(self, ranks: dict[int, RankMemory]) -> None:
        self._ranks = ranks

    def stop_serving(self) -> None:
        """Withdrawn: refuse new readers and end the sessions in progress (their targets fall back)."""
        self._ranks = {}
        for t in list(self._tasks):
            t.cancel()

    def _fresh_hello(self, msg: Hello) -> str:
        now = time.time()
        self._seen = {k: exp for k, exp in self._seen.items() if exp > now}
        if abs(now - msg.ts) > MAX_HELLO_AGE_S:
            return f"Hello is {now - msg.ts:.0f}s old (replayed or clock skew > {MAX_HELLO_AGE_S:.0f}s)"
        if msg.session in self._seen:
            return "Hello of a session already seen (replayed)"
        if len(self._seen) > 100_000:
            return "too many recent sessions"
        self._seen[msg.session] = now + 2 * MAX_HELLO_AGE_S
        return ""

    def _send(self, transport: Transport, peer: str, msg: Welcome | Ready) -> None:
        transport.send(peer, encode(self._keys.sign_msg("peer", msg)))

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def on_message(self, peer: str, msg: Hello | Done | Bye) -> None:
        if isinstance(msg, Hello):
            key = (peer, msg.session)
            if key in self._sessions or len(self._sessions) >= 64:
                log.warning("ignoring duplicate or excess Hello from %s", peer)
                return
            why = self._fresh_hello(msg)
            if why:
                log.warning("[model=%s role=source peer=%s] refused Hello: %s", self.model, peer, why)
                self._m.auth_failures.labels(self.model, "peer", "replay").inc()
                return
            s = self._sessions[key] = _Session(msg, peer)
            task = asyncio.get_running_loop().create_task(self._run(s))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        sess = self._sessions.get((peer, msg.session))
        if sess is None:
            return
        if isinstance(msg, Done):
            sess.done.put_nowait(msg.chunk)
        else:
            sess.bye.set()

    async def _run(self, s: _Session) -> None:
        rank = self._ranks.get(s.hello.rank)
        result = "ok"
        peer_name: str | None = None
        transport = rank.transport if rank else None
        try:
            if rank is None or transport is None:
                raise ProtocolError(f"this replica does not serve rank {s.hello.rank} (yet)")
            if self._coord is None:
                raise ProtocolError("no Redis: cannot look up the reader's metadata")
            meta = await self._coord.get_agent(s.hello.reader)
            try:
                peer_name = transport.add_peer(meta, s.peer)
            except ValueError as e:
                raise ProtocolError(str(e)) from None
            if s.hello.layout_digest != rank.manifest.layout_digest:
                raise ProtocolError("layout digest differs from this source's")
            if rank.ring is None:
                # Direct: the reader's READs need no work here over CMA/RDMA; the idle pump still drives
                # UCX's progress for transports that need it. Polling tightly here measured slower on 2 cores.
                self._send(transport, s.peer, Welcome(PROTOCOL_VERSION, s.hello.session, True))
                await asyncio.wait_for(s.bye.wait(), self._cfg.transfer_timeout)
            else:
                with transport.busy():
                    async with rank.ring.lock:
                        self._send(transport, s.peer, Welcome(PROTOCOL_VERSION, s.hello.session, True))
                        await self._feed_ring(s, rank)
            log.info("[model=%s role=source rank=%d peer=%s] served a reader", self.model, rank.rank, s.peer)
        except asyncio.CancelledError:
            result = "withdrawn"
            raise
        except (ProtocolError, CoordinatorUnavailable) as e:
            result = "refused"
            log.warning("[model=%s role=source peer=%s] refused reader: %s", self.model, s.peer, e)
            if transport is not None and peer_name == s.peer:
                self._send(transport, s.peer, Welcome(PROTOCOL_VERSION, s.hello.session, False, str(e)))
        except TimeoutError:
            result = "timeout"
            log.warning("[model=%s role=source peer=%s] reader stalled; session dropped", self.model, s.peer)
        except Exception as e:  # a dead reader (NIXL_ERR_REMOTE_DISCONNECT) must not take the source down
            result = "error"
            log.warning("[model=%s role=source peer=%s] session failed: %s", self.model, s.peer, e)
        finally:
            self._sessions.pop((s.peer, s.hello.session), None)
            if transport is not None and peer_name is not None:
                transport.remove_peer(peer_name)
            self._m.serve_sessions.labels(self.model, result).inc()

    async def _feed_ring(self, s: _Session, rank: RankMemory) -> None:
        ring = rank.ring
        assert ring is not None and rank.transport is not None
        chunks = chunk_plan(rank.manifest.tensors, ring.slot_bytes)
        nslots = len(ring.slots)
        finished: set[int] = set()
        stall = self._cfg.stall_timeout
        t0 = time.monotonic()

        async def wait_done(k: int) -> None:
            while k not in finished:
                finished.add(await asyncio.wait_for(s.done.get(), stall))

        for chunk in chunks:
            if s.bye.is_set():
                raise ProtocolError("reader left mid-transfer")
            if chunk.index >= nslots:
                await wait_done(chunk.index - nslots)  # the slot is free only when its reader is done
            await ring.fill(chunk, rank.entry_addrs)
            self._send(rank.transport, s.peer, Ready(PROTOCOL_VERSION, s.hello.session, chunk.index,
                                                     ring.slot_for(chunk)))
        for chunk in chunks[-nslots:]:
            await wait_done(chunk.index)
        log.debug("rank %d: ring fed %d chunks in %.2fs", rank.rank, len(chunks), time.monotonic() - t0)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
