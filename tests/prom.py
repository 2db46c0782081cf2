"""A real Prometheus server on loopback for the tests: file-based service discovery, our alert rules, HTTP API.

The binary comes from `make tools` (Debian's prometheus package, unpacked). The server keeps its TSDB in a
private directory and dies with its parent (PR_SET_PDEATHSIG), like sidecar/lab/embedded_redis.py's Redis.
"""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.tooling import DEPLOY

NAMESPACE = "mx-test"  # the `namespace` target label a PodMonitor would add


def rule_groups(overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """The PrometheusRule's spec (a plain rule file), with the threshold records replaced where asked."""
    spec = yaml.safe_load((DEPLOY / "monitoring" / "prometheusrule.yaml").read_text())["spec"]
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("record") in (overrides or {}):
                rule["expr"] = overrides[rule["record"]]  # type: ignore[index]
    return spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Prometheus:
    def __init__(self, binary: str, work: Path, rules: dict[str, Any], interval: str = "1s") -> None:
        self.dir = work
        work.mkdir(parents=True, exist_ok=True)
        self.targets_file = work / "targets.json"
        self._targets: list[dict[str, Any]] = []
        self._write_targets()
        (work / "rules.yaml").write_text(yaml.safe_dump(rules))
        (work / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(work / "rules.yaml")],
            "scrape_configs": [{"job_name": "mx-sidecar", "scrape_timeout": interval,
                                "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "1s"}]}],
        }))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (work / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{(work / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def _write_targets(self) -> None:
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._targets))
        tmp.replace(self.targets_file)  # atomic: discovery never reads half a file

    def add_target(self, port: int, pod: str) -> None:
        self._targets.append({"targets": [f"127.0.0.1:{port}"],
                              "labels": {"namespace": NAMESPACE, "pod": pod, "container": "mx-sidecar"}})
        self._write_targets()

    def api(self, path: str, **params: Any) -> Any:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return list(self.api("query_range", query=expr, start=start, end=end, step=step)["result"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def scraped_up(self) -> dict[str, float]:
        return {r["metric"]["pod"]: float(r["value"][1]) for r in self.query("up")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
