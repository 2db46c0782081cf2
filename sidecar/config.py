"""The validated configuration: the MX_* settings of sidecar/settings.py plus the checks between them.

Every setting is declared once, in sidecar/settings.py (a leaf module: standard library only); this module adds
what needs several settings at once (Redis AUTH/TLS combinations, heartbeat vs. TTL, tcp:// hook opt-in).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sidecar.settings import ConfigError, Settings, parse_env

__all__ = ["Config", "cache_address", "cli_config", "rank_address"]


@dataclass(frozen=True)
class Config(Settings):
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        values, errors = parse_env(os.environ if env is None else env)
        values.update(overrides)
        if errors:
            raise ConfigError("invalid configuration: " + "; ".join(errors))
        cfg = cls(**values)
        cfg._check_relations()
        return cfg

    def _check_relations(self) -> None:
        self._check_redis_auth()
        if self.zmq_address.startswith("tcp://") and not self.allow_tcp_hook:
            raise ConfigError(f"MX_ZMQ_ADDRESS={self.zmq_address}: tcp:// lets any process that reaches the port "
                              "drive the engine; use ipc:// (default) or set MX_ALLOW_TCP_HOOK=1")
        if self.heartbeat_interval * 2 > self.source_ttl:
            raise ConfigError(
                f"MX_SOURCE_TTL ({self.source_ttl}s) must be at least twice MX_HEARTBEAT_INTERVAL "
                f"({self.heartbeat_interval}s), or one late beat drops a live source"
            )

    def _check_redis_auth(self) -> None:
        url = urlsplit(self.redis_url)
        if bool(self.redis_tls_cert_file) != bool(self.redis_tls_key_file):
            raise ConfigError("MX_REDIS_TLS_CERT_FILE and MX_REDIS_TLS_KEY_FILE go together (a client certificate "
                              "needs its key)")
        tls_files = self.redis_tls_ca_file or self.redis_tls_cert_file
        if tls_files and url.scheme != "rediss":
            raise ConfigError("MX_REDIS_TLS_* files are set but MX_REDIS_URL is not rediss:// (TLS is chosen by "
                              "the URL)")
        if self.redis_password_file and url.password:
            raise ConfigError("MX_REDIS_URL holds a password and MX_REDIS_PASSWORD_FILE is set: use one of them")
        if self.redis_username and url.username and url.username != self.redis_username:
            raise ConfigError("MX_REDIS_URL names another user than MX_REDIS_USERNAME")

    def rank_address(self, rank: int) -> str:
        return rank_address(self.zmq_address, rank)


def _beside(base: str, tag: str, port_offset: int) -> str:
    """An address derived from `base`: ipc paths get `-<tag>` before the extension, tcp ports move by the offset."""
    if base.startswith("ipc://"):
        stem, dot, ext = base.rpartition(".")
        if dot and "/" not in ext:
            return f"{stem}-{tag}.{ext}"
        return f"{base}-{tag}"
    host, _, port = base.rpartition(":")
    return f"{host}:{int(port) + port_offset}"


def cache_address(base: str) -> str:
    """The compile cache's hook sockets beside the engine's: `ipc:///tmp/mx/vllm.sock` -> `.../vllm-cache.sock`
    (its rank 0: `vllm-cache-0.sock`); `tcp://h:5550` -> `tcp://h:6550` (ranks stay below +1000)."""
    return _beside(base, "cache", 1000)


def rank_address(base: str, rank: int) -> str:
    """`ipc:///tmp/mx/vllm.sock` -> `ipc:///tmp/mx/vllm-0.sock`; `tcp://h:5550` -> `tcp://h:5550+rank`."""
    return _beside(base, str(rank), rank)


def cli_config(prog: str) -> Config | None:
    """The configuration of a command-line entry point, with logging set up; None after printing why a setting is
    nonsense (the caller exits 2)."""
    from sidecar.logs import setup_logging

    try:
        cfg = Config.from_env()
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
    setup_logging(cfg.log_level, cfg.log_format)
    return cfg
