"""Prometheus metrics and the HTTP endpoints /metrics, /healthz, /readyz.

Each daemon owns its registry (no process-global state, so tests can run several). Labels stay
bounded: model, rank, role, result, phase; never a process id or a peer name. Names follow Prometheus'
conventions (base units: bytes, seconds; `_total` on counters), checked by `promtool check metrics` in the tests;
the alerts and the dashboard in deploy/monitoring/ use exactly these names.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("mx.metrics")

ROLES = ("unknown", "source", "target", "serving", "withdrawn")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.transfer_bytes = Counter("mx_transfer_bytes", "Bytes moved by NIXL READs", ["model", "rank", "role"],
                                      registry=r)
        self.transfer_seconds = Histogram(
            "mx_transfer_duration_seconds", "Wall time of one rank's transfer", ["model", "role"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640))
        self.last_rate = Gauge("mx_last_transfer_bytes_per_second", "Throughput of the last receive (all ranks)",
                               ["model", "role"], registry=r)
        self.transfers = Counter("mx_transfers", "Transfers by outcome", ["model", "role", "result"], registry=r)
        self.role = Gauge("mx_role", "1 for the replica's current role", ["model", "role"], registry=r)
        self.sources_visible = Gauge("mx_sources_visible", "Live sources seen at the last choice", ["model"],
                                     registry=r)
        self.registered_bytes = Gauge("mx_registered_bytes", "Bytes registered with NIXL", ["model", "kind"],
                                      registry=r)
        self.time_to_ready = Gauge("mx_time_to_ready_seconds", "Sidecar start to engine released",
                                   ["model", "role"], registry=r)
        self.decisions = Counter("mx_role_decisions", "How the role was decided", ["model", "decision"],
                                 registry=r)
        self.redis_errors = Counter("mx_redis_errors", "Redis operations that failed (Redis down)",
                                    ["model", "op"], registry=r)
        self.engine_errors = Counter("mx_engine_errors", "Engine hook requests that failed",
                                     ["model", "rank", "op"], registry=r)
        self.bad_messages = Counter("mx_bad_messages", "Messages rejected as malformed or unexpected",
                                    ["model", "channel"], registry=r)
        self.serve_sessions = Counter("mx_serve_sessions", "Reads served to targets", ["model", "result"],
                                      registry=r)
        self.startup_seconds = Gauge("mx_startup_seconds", "Start-up phases", ["model", "phase"], registry=r)
        self.auth_failures = Counter("mx_auth_failures", "Input refused for a missing or wrong MAC, or a replay",
                                     ["model", "channel", "reason"], registry=r)
        self.records_authenticated = Gauge("mx_records_authenticated",
                                           "1: records and messages are authenticated with a deployment key; "
                                           "0: UNAUTHENTICATED", ["model"], registry=r)
        self.task_failures = Counter("mx_background_task_failures", "Background tasks that died (the process exits)",
                                     ["model", "task"], registry=r)
        self.withdrawals = Counter("mx_source_withdrawals", "A source stopped serving because its engine changed",
                                   ["model", "reason"], registry=r)
        self.fence_failures = Counter("mx_fence_failures", "Attempts whose READs could not be confirmed finished "
                                      "(the process exits with the engine blocked)", ["model"], registry=r)
        self.source_published = Gauge("mx_source_published",
                                      "1 while this replica's source record is published in Redis", ["model"],
                                      registry=r)
        self.ready = False
        self.healthy = True

    def set_role(self, model: str, role: str) -> None:
        for r in ROLES:
            self.role.labels(model, r).set(1 if r == role else 0)
        self.source_published.labels(model)  # 0 until published: "no live source" needs the zero

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HttpServer:
    """Just enough HTTP/1.1 for Prometheus and kubelet probes, on the daemon's event loop."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._m = metrics
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, self._m.render()
            elif path == "/healthz":
                ok = self._m.healthy
                status, ctype, body = (200 if ok else 503), "text/plain", (b"ok\n" if ok else b"unhealthy\n")
            elif path == "/readyz":
                ok = self._m.ready
                status, ctype, body = (200 if ok else 503), "text/plain", (b"ready\n" if ok else b"not ready\n")
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError) as e:
            log.debug("http: %s", e)
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
