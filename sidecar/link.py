"""ZMQ client for one engine rank's hook socket (asyncio), speaking for this sidecar's session.

Requests are multiplexed: pings flow while a long `prepare_target` or `load_from_storage` is
outstanding (before, one request at a time meant a long prepare silenced the sidecar and the hook
took it for dead). Replies are matched by id; a late reply to a timed-out request is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

import zmq
import zmq.asyncio

from sidecar.contract.auth import Keyring
from sidecar.contract.codec import PROTOCOL_VERSION, ProtocolError, decode, encode
from sidecar.contract.messages import Op, Reply, Request
from sidecar.errors import EngineError, EngineRestarted

log = logging.getLogger("mx.link")



class EngineLink:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, rank: int, max_message_bytes: int,
                 session: str, keys: Keyring) -> None:
        self.address = address
        self.rank = rank
        self.session = session
        self._keys = keys
        self._max = max_message_bytes
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.connect(address)
        self.last_reply: Reply | None = None  # newest reply of any kind: the rank's state as last seen
        self.incarnation = ""  # the engine process this link first heard from
        self.restarted: EngineRestarted | None = None  # set once another engine process answered on the socket

    async def request(self, op: Op, timeout: float) -> Reply:
        if self.restarted is not None:
            raise self.restarted
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"link-{self.rank}")
        req_id = next(self._ids)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = fut
        req = self._keys.sign_msg("hook", Request(PROTOCOL_VERSION, req_id, op, self.session))
        try:
            await self._sock.send(encode(req))
            try:
                reply = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise EngineError(f"rank {self.rank}: no reply to {op} within {timeout:.0f}s from "
                                  f"{self.address}") from None
        finally:
            self._waiting.pop(req_id, None)
        if not reply.ok:
            raise EngineError(f"rank {self.rank}: {op} refused: {reply.error} (state {reply.state})")
        return reply

    async def _read(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                reply = decode(Reply, data, self._max)
            except ProtocolError as e:
                # Not attributable to a request: fail them all rather than guess.
                for fut in self._waiting.values():
                    if not fut.done():
                        fut.set_exception(EngineError(f"rank {self.rank}: bad reply: {e}"))
                continue
            if reply.incarnation and reply.incarnation != self.incarnation:
                if not self.incarnation:
                    self.incarnation = reply.incarnation
                elif self.restarted is None:
                    self.restarted = EngineRestarted(
                        f"rank {self.rank}: the engine restarted (incarnation {self.incarnation[:8]} -> "
                        f"{reply.incarnation[:8]}); its memory and our session are gone")
                    for fut in self._waiting.values():
                        if not fut.done():
                            fut.set_exception(self.restarted)
                    continue
            waiter = self._waiting.get(reply.id)
            if waiter is None or waiter.done():
                log.debug("rank %d: dropping stale reply %d", self.rank, reply.id)
                continue
            self.last_reply = reply
            waiter.set_result(reply)

    async def wait_until_up(self, timeout: float, attempt_timeout: float = 2.0) -> Reply:
        """Ping until the hook answers. ZMQ connects lazily, so the socket may appear at any time."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.request("ping", min(attempt_timeout, max(deadline - time.monotonic(), 0.05)))
            except EngineError:
                if time.monotonic() >= deadline:
                    raise EngineError(f"rank {self.rank}: engine socket {self.address} did not answer "
                                      f"within {timeout:.0f}s") from None

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._sock.close(0)
