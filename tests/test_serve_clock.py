"""Time to serve is measured for every replica whose engine has a ready URL, with or without a compile cache
(sidecar/serve_clock.py): real sidecars, stand-in engines, Redis and NIXL; the engine's readiness is a file."""

from __future__ import annotations

from tests.test_end_to_end import _metric


def test_a_target_without_a_compile_cache_reports_its_time_to_serve_split_into_weights_and_engine(replicas, work):
    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    ready = work / "b-ready"
    b = replicas("b", extra_env={"MX_ENGINE_READY_URL": f"file://{ready}"})
    b.engine_results()
    b.wait_serving()
    assert b.sidecar is not None
    _, text = b.http("/metrics")
    assert "mx_time_to_serve_seconds{" not in text, "timed before the engine answered"
    ready.touch()  # the engine answers its readiness probe
    m = b.sidecar.wait_for(r"phase=serve ([\d.]+)s: .*\(weights ([\d.]+)s, engine ([\d.]+)s\)", 30)
    total, weights, engine = (float(m.group(i)) for i in (1, 2, 3))
    assert weights > 0 and engine > 0 and abs(weights + engine - total) < 0.02
    _, text = b.http("/metrics")
    assert abs(_metric(text, "mx_time_to_serve_seconds", role="target") - total) < 0.01
    assert _metric(text, "mx_time_to_serve_phase_seconds", phase="weights") > 0
    assert 'phase="cache_install"' not in text, "no compile cache was asked for"


def test_without_a_ready_url_no_time_to_serve_is_claimed(replicas):
    a = replicas("a")
    a.engine_results()
    a.wait_serving()
    _, text = a.http("/metrics")
    assert "mx_time_to_serve_seconds{" not in text
    assert a.sidecar is not None and not any("phase=serve" in ln for ln in a.sidecar.lines)
