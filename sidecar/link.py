"""ZMQ client for one engine rank's hook socket (asyncio)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import zmq
import zmq.asyncio

from sidecar.protocol import PROTOCOL_VERSION, Op, ProtocolError, Reply, Request, decode_reply, encode

log = logging.getLogger("mx.link")


class EngineError(RuntimeError):
    """The hook answered with ok=false, or did not answer in time."""


class EngineLink:
    """A DEALER socket to one rank. Requests carry ids so a late reply to a timed-out request is dropped."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, rank: int, max_message_bytes: int) -> None:
        self.address = address
        self.rank = rank
        self._max = max_message_bytes
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.connect(address)

    async def request(self, op: Op, timeout: float) -> Reply:
        async with self._lock:  # one request in flight per rank keeps replies in order
            req_id = next(self._ids)
            await self._sock.send(encode(Request(PROTOCOL_VERSION, req_id, op)))
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await self._sock.poll(remaining * 1000):
                    raise EngineError(f"rank {self.rank}: no reply to {op} within {timeout:.0f}s from {self.address}")
                data = await self._sock.recv()
                try:
                    reply = decode_reply(data, self._max)
                except ProtocolError as e:
                    raise EngineError(f"rank {self.rank}: bad reply to {op}: {e}") from None
                if reply.id != req_id:
                    log.debug("rank %d: dropping stale reply %d", self.rank, reply.id)
                    continue
                if not reply.ok:
                    raise EngineError(f"rank {self.rank}: {op} refused: {reply.error} (state {reply.state})")
                return reply

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

    def close(self) -> None:
        self._sock.close(0)
