"""A vLLM replica made of real processes: `python -m tests.vllm.engine` (vLLM with `load_format="mx-sidecar"`)
plus, optionally, its sidecar `python -m sidecar run`, configured only through MX_* variables as in a pod."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from sidecar.lab.replica_procs import Proc

REPO = Path(__file__).resolve().parents[2]

FAST_ENV = {
    "MX_HEARTBEAT_INTERVAL": "0.5",
    "MX_SOURCE_TTL": "3",
    "MX_SEED_LEASE_TTL": "3",
    "MX_POLL_INTERVAL": "0.1",
    "MX_STALL_TIMEOUT": "20",
    "MX_LOG_LEVEL": "info",
}


class VllmReplica:
    def __init__(self, name: str, model: str | Path, work: Path, redis_url: str | None = None, tp: int = 1,
                 load_format: str = "mx-sidecar", sidecar: bool = True, extra_env: dict[str, str] | None = None,
                 engine_args: list[str] | None = None) -> None:
        self.name = name
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # carried packages too
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, "MX_ZMQ_ADDRESS": f"ipc://{work}/{name}.sock",
               "MX_METRICS_PORT": "0", "MX_METRICS_HOST": "127.0.0.1", "MX_TP_SIZE": str(tp), **FAST_ENV,
               **({"MX_REDIS_URL": redis_url} if redis_url else {}), **(extra_env or {})}
        self.sidecar = Proc(f"{name}-sidecar", [sys.executable, "-m", "sidecar", "run"], env, work) if sidecar else None
        args = [sys.executable, "-m", "tests.vllm.engine", "--model", str(model), "--tp", str(tp),
                "--load-format", load_format, *(engine_args or [])]
        self.engine = Proc(f"{name}-engine", args, env, work)

    def result(self, timeout: float = 300) -> dict[str, Any]:
        return json.loads(self.engine.wait_for(r"^MX_RESULT (.*)", timeout).group(1))  # type: ignore[no-any-return]

    def check(self, timeout: float = 120) -> list[dict[str, Any]]:
        return json.loads(self.engine.wait_for(r"^MX_CHECK (.*)", timeout).group(1))  # type: ignore[no-any-return]

    def outcomes(self, res: dict[str, Any]) -> list[str]:
        return [res["ranks"][r]["outcome"] for r in sorted(res["ranks"])]

    def wait_serving(self, timeout: float = 60) -> None:
        assert self.sidecar is not None
        self.sidecar.wait_for(r"serving as a source", timeout)

    def stop(self) -> None:
        if self.sidecar is not None:
            self.sidecar.stop()
        self.engine.stop(30)
