"""Reader sessions on the source: one per (reader, Hello), from Welcome to the end of the reader's READs.

A session looks up the reader's agent metadata in Redis (bounded size), checks the layout digest, answers
Welcome, and then either (direct) stays attentive while the reader READs engine memory, or (staged) joins the
reader to the rank's staging pass, which feeds every reader in it at once (sidecar.source.ring: Carousel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.config import Config
from sidecar.contract.codec import PROTOCOL_VERSION, ProtocolError
from sidecar.contract.messages import MAX_HELLO_AGE_S, Bye, Hello, Ready, Welcome
from sidecar.coordinator import Coordinator
from sidecar.errors import CoordinatorUnavailable
from sidecar.memory.rank_memory import RankMemory
from sidecar.metrics import Metrics
from sidecar.source.ring import Straggler
from sidecar.transport import Transport

log = logging.getLogger("mx.serving")

Send = Callable[[Transport, str, Welcome | Ready | Bye], None]


def _ignore(chunk: int) -> None:
    """A Done before the reader joined a pass (or in direct mode) moves nothing."""


@dataclass
class ReaderSession:
    hello: Hello
    peer: str
    on_done: Callable[[int], None] = _ignore  # the reader's READ of a chunk completed (its Done notification)
    bye: asyncio.Event = field(default_factory=asyncio.Event)


class HelloGuard:
    """Replay protection: a Hello must be fresh and its session id not seen recently."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}  # Hello session ids seen recently -> expiry

    def check(self, msg: Hello) -> str:
        """'' if the Hello may start a session, else why not."""
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


class ReaderGone(RuntimeError):
    pass


class PassFull(ProtocolError):
    """The rank's staging pass has MX_FANOUT_READERS readers: the reader is refused at once and looks elsewhere."""


async def _until_bye(s: ReaderSession, coord: Coordinator, cfg: Config) -> None:
    """A direct session ends with the reader's Bye, within MX_TRANSFER_TIMEOUT. The reader READs without telling
    us, so its liveness is its agent metadata, which it refreshes in Redis while it receives (TTL MX_SOURCE_TTL):
    once that expired, the reader is gone and its slot (one of 64) is freed, instead of held for the full timeout.
    Redis down: the reader's fate is unknown and the transfer timeout alone bounds the session."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.transfer_timeout
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(s.bye.wait(), min(left, cfg.source_ttl))
            return
        try:
            alive = await coord.agent_published(s.hello.reader)
        except CoordinatorUnavailable:
            continue
        if not alive:
            raise ReaderGone(f"reader {s.hello.reader} no longer refreshes its metadata (gone for "
                             f"{cfg.source_ttl:.0f}s or more)")


async def _in_pass(s: ReaderSession, rank: RankMemory, transport: Transport, send: Send) -> None:
    """Staged: the reader joins the rank's pass (Welcome first, then one Ready per chunk, wrapping round from
    wherever the pass is) until it READ every chunk, left, or was dropped."""
    ring = rank.ring
    assert ring is not None and ring.carousel is not None
    carousel, key = ring.carousel, (s.peer, s.hello.session)

    def announce(chunk: int, slot: int) -> None:
        send(transport, s.peer, Ready(PROTOCOL_VERSION, s.hello.session, chunk, slot))

    with transport.busy():
        finished = carousel.join(key, announce)
        if finished is None:
            raise PassFull(f"{carousel.readers} readers already in rank {rank.rank}'s pass")
        # No await between the join and this send: the pass announces its first slot only after the Welcome.
        send(transport, s.peer, Welcome(PROTOCOL_VERSION, s.hello.session, True))
        s.on_done = lambda chunk: carousel.done(key, chunk)
        async def bye() -> None:
            await s.bye.wait()

        left = asyncio.ensure_future(bye())
        try:
            await asyncio.wait([finished, left], return_when=asyncio.FIRST_COMPLETED)
            if not finished.done():
                raise ReaderGone("reader left mid-transfer (Bye)")
            finished.result()
        finally:
            left.cancel()
            carousel.leave(key)
            if not finished.done():
                finished.cancel()


async def serve_reader(s: ReaderSession, rank: RankMemory | None, *, cfg: Config, model: str,
                       coord: Coordinator | None, metrics: Metrics, send: Send, forget: Callable[[], None],
                       agent: Transport | None = None) -> None:
    """Serve one reader to the end; `forget` drops the session from the server's table before it is counted.
    `agent`: the rank's agent even when the rank is not served (withdrawn): the refusal goes out from it."""
    result = "ok"
    peer_name: str | None = None
    transport = rank.transport if rank else agent
    try:
        if transport is None:  # never served this rank: the Hello did not come to one of our rank agents
            raise ProtocolError(f"this replica does not serve rank {s.hello.rank} (yet)")
        if coord is None:
            raise ProtocolError("no Redis: cannot look up the reader's metadata")
        meta = await coord.get_agent(s.hello.reader)
        try:
            peer_name = transport.add_peer(meta, s.peer)
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        if rank is None:
            raise ProtocolError(f"this replica no longer serves rank {s.hello.rank} (withdrawn)")
        if s.hello.layout_digest != rank.manifest.layout_digest:
            raise ProtocolError("layout digest differs from this source's")
        if rank.ring is None:
            # Direct: the reader's READs need no work here over CMA/RDMA; the idle pump still drives
            # UCX's progress for transports that need it. Polling tightly here measured slower on 2 cores.
            send(transport, s.peer, Welcome(PROTOCOL_VERSION, s.hello.session, True))
            await _until_bye(s, coord, cfg)
        else:
            await _in_pass(s, rank, transport, send)
        log.info("[model=%s role=source rank=%d peer=%s] served a reader", model, rank.rank, s.peer)
    except asyncio.CancelledError:
        result = "withdrawn"
        if transport is not None and peer_name == s.peer:  # tell the reader now; it would wait out a stall
            with contextlib.suppress(Exception):
                send(transport, s.peer, Bye(PROTOCOL_VERSION, s.hello.session, False))
        raise
    except PassFull as e:
        result = "busy"
        log.info("[model=%s role=source peer=%s] %s", model, s.peer, e)
        if transport is not None and peer_name == s.peer:
            send(transport, s.peer, Welcome(PROTOCOL_VERSION, s.hello.session, False, f"busy: {e}"))
    except (ProtocolError, CoordinatorUnavailable) as e:
        result = "refused"
        log.warning("[model=%s role=source peer=%s] refused reader: %s", model, s.peer, e)
        if transport is not None and peer_name == s.peer:
            send(transport, s.peer, Welcome(PROTOCOL_VERSION, s.hello.session, False, str(e)))
    except Straggler:
        result = "straggler"
        log.warning("[model=%s role=source peer=%s] reader held the others of its pass back for %.0fs; dropped",
                    model, s.peer, min(cfg.straggler_timeout, cfg.stall_timeout))
        if transport is not None and peer_name == s.peer:  # it falls to another source now, not after a stall
            with contextlib.suppress(Exception):
                send(transport, s.peer, Bye(PROTOCOL_VERSION, s.hello.session, False))
    except ReaderGone as e:
        result = "reader_gone"
        log.warning("[model=%s role=source peer=%s] %s; session dropped", model, s.peer, e)
    except TimeoutError:
        result = "timeout"
        log.warning("[model=%s role=source peer=%s] reader stalled; session dropped", model, s.peer)
    except Exception as e:  # a dead reader (NIXL_ERR_REMOTE_DISCONNECT) must not take the source down
        result = "error"
        log.warning("[model=%s role=source peer=%s] session failed: %s", model, s.peer, e)
    finally:
        forget()
        if transport is not None and peer_name is not None:
            transport.remove_peer(peer_name)
        metrics.serve_sessions.labels(model, result).inc()
