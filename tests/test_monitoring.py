"""Monitoring through real parts: a real Prometheus scrapes real sidecars (tests/fleet_run.py) and answers every
dashboard query and every alert expression from deploy/monitoring/; promtool lints our /metrics and unit-tests
the alert rules (tests/rules_test.yaml)."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fleet_run import FleetRun, fleet
from tests.prom import NAMESPACE, rule_groups
from tests.tooling import DEPLOY, ROOT, run, tool

DASHBOARD = DEPLOY / "monitoring" / "dashboards" / "mx-sidecar.json"
LABELS = {"model", "rank", "role", "result", "phase", "kind", "decision", "op", "channel", "reason", "task", "le"}


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tool("prometheus")  # skip or fail early, before starting processes
    with fleet(tmp_path_factory.mktemp("fleet")) as r:
        yield r


def _panel_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def _dashboard_expr(expr: str) -> str:
    """Grafana's variables as Grafana would expand them with namespace = the test's, model = All."""
    return expr.replace("$namespace", NAMESPACE).replace("$model", ".*")


def _alert_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups()["groups"] for r in g["rules"] if "alert" in r]


def _exported(fleet_run: FleetRun) -> str:
    texts = []
    for rep in fleet_run.replicas.values():
        if rep.sidecar is not None and rep.sidecar.p.poll() is None:
            texts.append(rep.http("/metrics")[1])
    return "\n".join(texts)


def test_the_fleet_run_reached_its_states(fleet_run):
    up = fleet_run.prom.scraped_up()
    assert up == {"a": 1, "b": 1, "d": 0, "e": 1, "f": 1, "g": 1, "h": 1}, up  # d's sidecar was killed on purpose
    outcome = {n: fleet_run.replicas[n].engine_results()[0]["outcome"] for n in "abefgh"}
    assert outcome == {"a": "loaded", "b": "received", "e": "loaded", "f": "loaded", "g": "loaded", "h": "loaded"}


@pytest.mark.parametrize("title,expr", _panel_exprs(), ids=[t for t, _ in _panel_exprs()])
def test_every_dashboard_panel_query_returns_data(fleet_run, title, expr):
    res = fleet_run.prom.query(_dashboard_expr(expr))
    assert res, f"panel {title!r}: no data for {expr}"
    assert any(math.isfinite(float(r["value"][1])) for r in res), res


def test_the_dashboard_variables_list_the_runs_namespace_and_models(fleet_run):
    dash = json.loads(DASHBOARD.read_text())
    q = {v["name"]: v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"}
    ns = re.fullmatch(r"label_values\((.+), namespace\)", q["namespace"]).group(1)  # type: ignore[union-attr]
    assert {r["metric"]["namespace"] for r in fleet_run.prom.query(ns)} == {NAMESPACE}
    m = re.fullmatch(r"label_values\((.+), model\)", q["model"]).group(1)  # type: ignore[union-attr]
    models = {r["metric"]["model"] for r in fleet_run.prom.query(_dashboard_expr(m))}
    assert models >= {"toy-a", "toy-c"}


@pytest.mark.parametrize("rule", _alert_rules(), ids=[r["alert"] for r in _alert_rules()])
def test_every_alert_expression_returns_data_on_the_run_and_prometheus_raises_it(fleet_run, rule):
    name, expr = rule["alert"], rule["expr"]
    res = fleet_run.prom.query(expr)
    assert res, f"{name}: no data for {expr}"
    held = {a["labels"]["alertname"]: a["state"] for a in fleet_run.prom.alerts()}
    assert held.get(name) in ("pending", "firing"), held


def test_each_alert_fires_for_the_model_that_caused_it(fleet_run):
    held: dict[str, set[str]] = {}
    for a in fleet_run.prom.alerts():
        held.setdefault(a["labels"]["alertname"], set()).add(a["labels"].get("model", a["labels"].get("pod", "")))
    assert held["MxFellBackToStorage"] == {"toy-b"}
    assert held["MxRedisErrors"] == {"toy-c"}
    assert held["MxNoLiveSource"] == {"toy-c"}
    assert held["MxSlowLink"] == {"toy-a"}  # b is the only replica that received over NIXL
    assert "toy-a" in held["MxTimeToReadySLO"]
    assert held["MxUnauthenticatedRecords"] == {"toy-a", "toy-b", "toy-c"}  # toy-d runs with keys
    assert held["MxAuthFailures"] == {"toy-d"}  # h (key B) refused g's record (key A)


def test_every_recording_rule_returns_data(fleet_run):
    for g in rule_groups()["groups"]:
        for r in g["rules"]:
            if "record" in r:
                assert fleet_run.prom.query(r["record"]), r["record"]


def test_promtool_finds_no_problem_in_any_sidecars_metrics(fleet_run, tmp_path):
    checked = 0
    for rep in fleet_run.replicas.values():
        if rep.sidecar is None or rep.sidecar.p.poll() is not None:
            continue
        status, text = rep.http("/metrics")
        assert status == 200
        res = run([tool("promtool"), "check", "metrics"], input=text)
        assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), (rep.name, res)
        checked += 1
    assert checked == 6


def test_metric_labels_stay_bounded(fleet_run):
    text = _exported(fleet_run)
    names = set()
    for line in text.splitlines():
        if line.startswith("mx_") and "{" in line:
            names |= set(re.findall(r'(\w+)="', line.split("{", 1)[1].rsplit("}", 1)[0]))
    assert names and names <= LABELS, sorted(names - LABELS)
    ranks = set(re.findall(r'rank="([^"]*)"', text))
    assert ranks <= {str(r) for r in range(64)}


def test_the_dashboard_png_renders_from_query_range_data(fleet_run, tmp_path):
    from tests.dashboard_png import render

    out = tmp_path / "dashboard.png"
    drawn = render(fleet_run.prom, fleet_run.t_start, time.time(), out)
    assert out.stat().st_size > 20_000
    assert drawn == len(_panel_exprs()), "every panel plotted real series"


def test_promtool_checks_and_unit_tests_the_alert_rules(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    res = run([tool("promtool"), "check", "rules", str(tmp_path / "rules.yaml")])
    assert res.returncode == 0, res.stdout + res.stderr
    shutil.copy(ROOT / "tests" / "rules_test.yaml", tmp_path / "rules_test.yaml")
    res = run([tool("promtool"), "test", "rules", str(tmp_path / "rules_test.yaml")])
    assert res.returncode == 0, res.stdout + res.stderr
    tested = set(re.findall(r"alertname: (\w+)", (tmp_path / "rules_test.yaml").read_text()))
    assert tested == {r["alert"] for r in _alert_rules()}, "every alert has a unit test"


def test_promtool_test_rules_fails_when_an_alert_is_broken(tmp_path):
    groups = rule_groups()
    for g in groups["groups"]:
        for r in g["rules"]:
            if r.get("alert") == "MxFellBackToStorage":
                r["expr"] = r["expr"].replace("fell_back_to_storage", "fell_back")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    shutil.copy(ROOT / "tests" / "rules_test.yaml", tmp_path / "rules_test.yaml")
    res = run([tool("promtool"), "test", "rules", str(tmp_path / "rules_test.yaml")])
    assert res.returncode != 0 and "MxFellBackToStorage" in res.stdout + res.stderr


def test_prometheus_rule_resource_and_dashboard_cover_the_issue_list():
    alerts = {r["alert"] for r in _alert_rules()}
    assert {"MxFellBackToStorage", "MxNoLiveSource", "MxSlowLink", "MxRedisErrors", "MxTimeToReadySLO",
            "MxUnauthenticatedRecords"} <= alerts
    titles = {t for t, _ in _panel_exprs()}
    assert {"Throughput of the last receive", "Time to ready", "Transfers by result (30 min)", "Live sources",
            "Fallbacks to storage (30 min)", "Redis errors (10 min)"} <= titles
    assert Path(ROOT / "docs" / "dashboard.png").exists(), "docs/dashboard.png: run `make dashboard-png`"


RUNBOOK = "https://github.com/mx-sidecar/mx-sidecar/blob/main/README.md#"


def _readme_anchors() -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out, fenced = set(), False
    for line in (ROOT / "README.md").read_text().splitlines():
        fenced ^= line.startswith("```")
        m = None if fenced else re.match(r"#{1,6} (.+)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("rule", _alert_rules(), ids=[r["alert"] for r in _alert_rules()])
def test_every_alert_links_a_runbook_whose_anchor_is_a_heading_in_the_readme(rule):
    url = rule["annotations"]["runbook_url"]
    assert url == RUNBOOK + "runbook-" + rule["alert"].lower()
    assert url.removeprefix(RUNBOOK) in _readme_anchors(), f"README.md has no heading for {url}"


def test_the_readme_anchor_check_misses_a_heading_that_is_not_there():
    assert "runbook-mxfellbacktostorage" in _readme_anchors()
    assert "runbook-mxnosuchalert" not in _readme_anchors()


_COUNTER = re.compile(r"\bmx_\w+_(?:total|bucket)\b")


def _counter_use_is_windowed(expr: str) -> bool:
    """Every raw counter (a _total or a histogram _bucket) sits inside rate()/increase() or the fresh-series
    guard `(x unless x offset w)` that goes with increase(); recording rules (mx:...) are windowed already."""
    stripped = re.sub(r"\b(?:rate|increase)\((?:[^()]|\([^()]*\))*\)", "", expr)
    stripped = re.sub(r"\(\s*(mx_\w+)(\{[^}]*\})?\s+unless\s+\1(\{[^}]*\})?\s+offset\s+\w+\)", "", stripped)
    return not _COUNTER.search(stripped)


@pytest.mark.parametrize("title,expr", _panel_exprs(), ids=[t for t, _ in _panel_exprs()])
def test_no_dashboard_panel_plots_a_raw_counter(title, expr):
    assert _counter_use_is_windowed(expr), f"{title}: {expr}"
    if "histogram_quantile" in expr:
        assert "rate(" in expr or ":increase" in expr, f"{title}: a quantile over counts since each pod started"


def test_the_raw_counter_check_flags_a_cumulative_panel():
    assert not _counter_use_is_windowed('sum by (model) (mx_transfers_total{model=~"$model"})')
    assert not _counter_use_is_windowed("histogram_quantile(0.9, sum by (le) (mx_transfer_duration_seconds_bucket))")
    assert _counter_use_is_windowed("sum(rate(mx_transfer_bytes_total[5m]))")


# ---------------------------------------------------------------------------- the HTTP server, through real sockets
async def _served(monkeypatch: pytest.MonkeyPatch, **bounds: float) -> Any:
    from sidecar.http_server import HttpServer, _BoundedProtocol
    from sidecar.metrics import Metrics

    for name, value in bounds.items():
        monkeypatch.setattr(_BoundedProtocol, name, value)
    srv = HttpServer(Metrics(), "127.0.0.1", 0)
    await srv.start()
    return srv


async def _get(port: int, request: bytes) -> bytes:
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


async def test_the_endpoints_answer_as_before(monkeypatch):
    srv = await _served(monkeypatch)
    try:
        get = [f"GET {p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
               for p in ("/healthz", "/readyz", "/metrics?x=1", "/nope")]
        health, ready, metrics, missing = [await _get(srv.port, g) for g in get]
        assert health.startswith(b"HTTP/1.1 200 ") and health.endswith(b"\r\n\r\nok\n")
        assert ready.startswith(b"HTTP/1.1 503 ") and ready.endswith(b"\r\n\r\nnot ready\n")
        assert metrics.startswith(b"HTTP/1.1 200 ") and b"text/plain; version=" in metrics
        assert b"mx_transfer_duration_seconds" in metrics
        assert missing.startswith(b"HTTP/1.1 404 ")
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (12 << 10) + b"\r\n\r\n"
        too_long = await _get(srv.port, big)
        assert too_long.startswith(b"HTTP/1.1 400 ")
    finally:
        await srv.close()


async def test_connections_over_the_cap_are_answered_503_and_the_rest_still_served(monkeypatch):
    import asyncio

    srv = await _served(monkeypatch, max_connections=3)
    try:
        idle = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(3)]
        refused = await _get(srv.port, b"")  # sends nothing: the answer comes at once
        assert refused.startswith(b"HTTP/1.1 503 ")
        idle[0][1].close()
        await asyncio.sleep(0.5)
        served = await _get(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert served.startswith(b"HTTP/1.1 200 ")
        for _, w in idle[1:]:
            w.close()
    finally:
        await srv.close()


async def test_a_client_that_trickles_half_a_header_is_dropped_after_the_deadline(monkeypatch):
    import asyncio

    srv = await _served(monkeypatch, deadline_s=1.0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        t0 = time.monotonic()
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":  # a byte every 0.1 s: each resets a naive read timeout
            if writer.is_closing() or reader.at_eof():
                break
            try:
                writer.write(bytes([b]))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed without an answer
        assert time.monotonic() - t0 < 20
        writer.close()
        # a kept-alive connection gets the same deadline for its next request
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"ok\n"), 30)).startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
    finally:
        await srv.close()
