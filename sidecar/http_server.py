"""/metrics, /healthz, /readyz over HTTP/1.1: uvicorn's h11 protocol with prometheus_client's own ASGI handler.

On the daemon's event loop (no thread, no signal handlers: uvicorn's Server is not used, only its protocol).
Bounded whatever a client does: at most MAX_CONNECTIONS at once (one more is answered 503 and closed), a request's
header must arrive whole within REQUEST_DEADLINE_S of the connection (or of the previous response on a kept-alive
one), however slowly it trickles, and a header over MAX_HEADER_BYTES is answered 400.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

import h11
import uvicorn
from prometheus_client import make_asgi_app
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

if TYPE_CHECKING:
    from sidecar.metrics import Metrics

log = logging.getLogger("mx.metrics")

MAX_CONNECTIONS = 32  # Prometheus, kubelet's probes and an operator's curl need a handful
REQUEST_DEADLINE_S = 10.0
KEEP_ALIVE_S = 5.0
MAX_HEADER_BYTES = 8 << 10
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 17\r\n"
            b"connection: close\r\n\r\ntoo many clients\n")


class _BoundedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus a connection cap and a header deadline (uvicorn has neither)."""

    max_connections = MAX_CONNECTIONS
    deadline_s = REQUEST_DEADLINE_S
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_REFUSED)
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._header_too_long(data):
            self.send_400_response("request header too long")
            return
        super().data_received(data)
        if self.conn.their_state is h11.DONE:  # a whole request arrived: the handler answers at once
            self._disarm()

    def _header_too_long(self, data: bytes) -> bool:
        """h11 bounds only a header that is still incomplete: one that arrived whole in a read passed at any size."""
        head = self.conn.trailing_data[0] + data
        end = head.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
        return end < 0 and len(head) > MAX_HEADER_BYTES

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.deadline_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        log.debug("http: closing a connection without a whole request after %.0fs", self.deadline_s)
        self.transport.close()


def make_app(metrics: Metrics) -> Any:
    """The ASGI app: prometheus_client's handler on /metrics, the probes on /healthz and /readyz."""
    prometheus = make_asgi_app(metrics.registry)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics":
            await prometheus(scope, receive, send)
            return
        if path == "/healthz":
            status, body = (200, b"ok\n") if metrics.healthy else (503, b"unhealthy\n")
        elif path == "/readyz":
            status, body = (200, b"ready\n") if metrics.ready else (503, b"not ready\n")
        else:
            status, body = 404, b"not found\n"
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class HttpServer:
    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._config = uvicorn.Config(
            make_app(metrics), http=_BoundedProtocol, lifespan="off", log_config=None, access_log=False,
            proxy_headers=False, server_header=False, timeout_keep_alive=int(KEEP_ALIVE_S),
            h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=MAX_CONNECTIONS + 1)
        self._state = ServerState()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        if self._server is not None:  # a life started over (daemon.run_daemon): the same endpoint serves on
            return
        self._config.load()
        family = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((self._host, self._port), family=family, backlog=MAX_CONNECTIONS)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _BoundedProtocol(config=self._config, server_state=self._state, app_state={}), sock=sock)
        self.port = sock.getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._state.connections):
            conn.transport.close()
        await self._server.wait_closed()
        self._server = None
