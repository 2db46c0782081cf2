"""`build(cfg)`: every part of a sidecar, composed once and handed to the daemon (no part reaches into another)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.agents import Agents
from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.coordinator import Coordinator
from sidecar.engine import EngineRanks
from sidecar.failpoints import Failpoints
from sidecar.http_server import HttpServer
from sidecar.logs import Ctx
from sidecar.metrics import Metrics
from sidecar.peers import PeerRouter
from sidecar.redis_client import connect as connect_redis
from sidecar.source.publisher import Publisher
from sidecar.source.server import SourceServer
from sidecar.supervisor import Supervisor
from sidecar.target.receiver import Receiver

MAX_AUTH_LOG_KEYS = 1000


class AuthFailures:
    """Counts refused unauthenticated input per channel and reason; logs each (channel, sender, reason) once,
    so a flood cannot flood the log."""

    def __init__(self, metrics: Metrics, model: Callable[[], str], log: Ctx) -> None:
        self._m, self._model, self._log = metrics, model, log
        self._logged: set[tuple[str, str, str]] = set()

    def __call__(self, channel: str, who: str, reason: str) -> None:
        self._m.auth_failures.labels(self._model(), channel, reason).inc()
        if (channel, who, reason) not in self._logged and len(self._logged) < MAX_AUTH_LOG_KEYS:
            self._logged.add((channel, who, reason))
            self._log.warning("refused unauthenticated %s input from %s: %s", channel, who, reason)


@dataclass
class Parts:
    cfg: Config
    replica_id: str
    metrics: Metrics
    http: HttpServer
    log: Ctx
    keys: Keyring
    failpoints: Failpoints
    stop: asyncio.Event
    sup: Supervisor
    engine: EngineRanks
    coord: Coordinator
    server: SourceServer
    router: PeerRouter
    agents: Agents
    publisher: Publisher
    receiver: Receiver


def build(cfg: Config, carried: tuple[Metrics, HttpServer] | None = None) -> Parts:
    """`carried`: the metrics and endpoint of a life that ended because its engine was lost (counters go on,
    the port stays bound); everything else is new, a new replica id and session included."""
    replica_id = f"{cfg.node_name}-{os.getpid()}-{secrets.token_hex(3)}"
    metrics = carried[0] if carried else Metrics()
    log = Ctx(logging.getLogger("mx.daemon"), {"model": "?", "role": "starting"})
    keys = Keyring.from_file(cfg.auth_key_file)
    failpoints = Failpoints(cfg.test_failpoints)
    stop = asyncio.Event()
    engine = EngineRanks(cfg, keys, metrics, log, failpoints)
    model = lambda: engine.model  # noqa: E731 - named once, read by every part that labels metrics
    sup = Supervisor(metrics, model, stop)
    auth_failed = AuthFailures(metrics, model, log)
    coord = Coordinator(connect_redis(cfg), cfg.redis_prefix, replica_id, cfg.node_name, cfg.source_ttl,
                        cfg.max_message_bytes, cfg.max_metadata_bytes, keys,
                        lambda who, why: auth_failed("redis", who, why), cfg.topology)
    server = SourceServer(cfg, "?", coord, metrics, keys)
    router = PeerRouter(server.on_message,  # type: ignore[arg-type]
                        lambda why: metrics.bad_messages.labels(engine.model, "nixl").inc(),
                        keys, lambda peer, why: auth_failed("peer", peer, why))
    agents = Agents(replica_id, router, sup.spawn, failpoints)
    publisher = Publisher(cfg, replica_id, coord, agents, engine, server, metrics, log, failpoints)
    receiver = Receiver(cfg, coord, router, engine, metrics, log, keys, failpoints)
    http = carried[1] if carried else HttpServer(metrics, cfg.metrics_host, cfg.metrics_port)
    return Parts(cfg, replica_id, metrics, http, log, keys,
                 failpoints, stop, sup, engine, coord, server, router, agents, publisher, receiver)
