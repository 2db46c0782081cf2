"""Start a replica (toy engine process + sidecar process) on this machine: used by the demo, tests and bench.

Real processes, real sockets: the engine is `python -m sidecar.lab.toy_engine`, the sidecar is
`python -m sidecar run`, configured only through MX_* variables, exactly as in a pod.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


class Proc:
    """A child process whose output lines are collected in the background."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.lines: list[str] = []
        self.times: list[float] = []  # time.monotonic() when each line arrived
        self._cv = threading.Condition()
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        self.p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self._log.write(line)
            self._log.flush()
            with self._cv:
                self.times.append(time.monotonic())
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str]:
        """The first output line matching `pattern`, from line `after` on (waits on new output, no polling)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = after
        with self._cv:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.p.poll() is not None and not self._t.is_alive()):
                    tail = "\n".join(self.lines[-30:])
                    raise TimeoutError(f"{self.name}: no line matching {pattern!r} in {timeout:.0f}s; "
                                       f"exit={self.p.poll()}\n{tail}")
                self._cv.wait(remaining)

    def time_of(self, pattern: str, timeout: float) -> float:
        """When (time.monotonic()) the first line matching `pattern` arrived; waits for it like wait_for."""
        self.wait_for(pattern, timeout)
        rx = re.compile(pattern)
        with self._cv:
            return next(t for line, t in zip(self.lines, self.times, strict=True) if rx.search(line))

    def wait(self, timeout: float) -> int:
        """The exit status; past `timeout`, first asks the process for its threads' stacks (SIGUSR1, which the
        mx CLIs answer with faulthandler) so that the TimeoutError says where it hangs."""
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGUSR1)
            time.sleep(2)  # the pump thread collects the dump
            tail = "\n".join(self.lines[-120:])
            raise TimeoutError(f"{self.name}: still running after {timeout:.0f}s; last output:\n{tail}") from None

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def stop(self, timeout: float = 10) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait(5)


class Replica:
    """One inference pod: an engine with `tp` ranks and its sidecar."""

    def __init__(self, name: str, checkpoint: str | Path, redis_url: str, work: Path, tp: int = 2,
                 model_id: str = "toy-llama", revision: str = "r1", extra_env: dict[str, str] | None = None,
                 sidecar: bool = True, sidecar_timeout: float = 60.0, devices: str = "cpu",
                 engine_args: list[str] | None = None) -> None:
        self.name = name
        self.tp = tp
        self.address = f"ipc://{work}/{name}.sock"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MX_ZMQ_ADDRESS": self.address, "MX_REDIS_URL": redis_url,
               "MX_METRICS_PORT": "0", "MX_METRICS_HOST": "127.0.0.1", "MX_TP_SIZE": str(tp),
               "MX_SIDECAR_TIMEOUT": str(sidecar_timeout), **(extra_env or {})}
        self.env = env
        self._work = work
        self._sidecars = 1
        self._engine_cmd = [sys.executable, "-m", "sidecar.lab.toy_engine", "--checkpoint", str(checkpoint), "--tp",
                            str(tp), "--model-id", model_id, "--revision", revision, "--sidecar-timeout",
                            str(sidecar_timeout), "--devices", devices, *(engine_args or [])]
        self._engines = 1
        self.engine = Proc(f"{name}-engine", self._engine_cmd, env, work)
        self.sidecar = Proc(f"{name}-sidecar", [sys.executable, "-m", "sidecar", "run"], env, work) if sidecar else None
        self._metrics_port: int | None = None

    def new_sidecar(self, extra_env: dict[str, str] | None = None) -> Proc:
        """A fresh sidecar process for the same engine (what Kubernetes does after the sidecar container died)."""
        self._sidecars += 1
        self._metrics_port = None
        env = {**self.env, **(extra_env or {})}
        self.sidecar = Proc(f"{self.name}-sidecar{self._sidecars}", [sys.executable, "-m", "sidecar", "run"], env,
                            self._work)
        return self.sidecar

    def restart_engine(self) -> Proc:
        """Kill the engine (SIGKILL: an OOM kill) and start a new one on the same sockets, the sidecar untouched:
        what Kubernetes does when only the engine container restarts."""
        self.kill_engine()
        return self.start_engine()

    def kill_engine(self) -> None:
        self.engine.signal(signal.SIGKILL)
        self.engine.p.wait(10)

    def start_engine(self) -> Proc:
        self._engines += 1
        self.engine = Proc(f"{self.name}-engine{self._engines}", self._engine_cmd, self.env, self._work)
        return self.engine

    def engine_results(self, timeout: float = 60) -> dict[int, dict]:  # type: ignore[type-arg]
        out = {}
        for r in range(self.tp):
            m = self.engine.wait_for(rf'^\{{"rank": {r}, .*', timeout)
            out[r] = json.loads(m.group(0))
        return out

    @property
    def metrics_port(self) -> int:
        if self._metrics_port is None:
            assert self.sidecar is not None
            m = self.sidecar.wait_for(r"metrics on http://[^:]+:(\d+)/metrics", 30)
            self._metrics_port = int(m.group(1))
        return self._metrics_port

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_serving(self, timeout: float = 60) -> None:
        assert self.sidecar is not None
        self.sidecar.wait_for(r"serving as a source", timeout)

    def stop(self) -> None:
        if self.sidecar is not None:
            self.sidecar.stop()
        self.engine.stop()
