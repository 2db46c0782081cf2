"""Prometheus metrics (served with /healthz and /readyz by sidecar/http_server.py).

Each daemon owns its registry (no process-global state, so tests can run several). Labels stay
bounded: model, rank, role, result, phase; never a process id or a peer name. Names follow Prometheus'
conventions (base units: bytes, seconds; `_total` on counters), checked by `promtool check metrics` in the tests;
the alerts and the dashboard in deploy/monitoring/ use exactly these names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.engine_restarts = Counter("mx_engine_restarts", "Lives started over because the engine was lost",
                                       ["model", "reason"], registry=r)  # reason: restarted | gone
        # Compile caches (sidecar/compile_cache): result hit | miss (installed; the engine compiled anyway) |
        # mismatch (live caches of other keys) | none (no live cache) | present (already in the root) |
        # refused (no deployment key: caches are code) | failed (receive or install failed; the engine compiles)
        self.compile_cache = Counter("mx_compile_cache", "Compile cache requests of an engine, by result",
                                     ["model", "result"], registry=r)
        # The "ahead" request (vLLM: modelinfos/, read before the engine builds its config): installed | present |
        # none | mismatch | refused | failed, as above; used | rewritten once the engine serves (it kept the files, or
        # wrote its own over them: they did not fit its code).
        self.compile_cache_ahead = Counter("mx_compile_cache_ahead", "Requests for what an engine reads before it "
                                           "builds its config (vLLM: modelinfos/), by result", ["model", "result"],
                                           registry=r)
        self.compile_cache_published = Gauge("mx_compile_cache_published",
                                              "1 while this replica serves its compile cache", ["model"], registry=r)
        self.time_to_serve = Gauge("mx_time_to_serve_seconds", "Sidecar start to the engine answering its ready URL "
                                   "(MX_ENGINE_READY_URL)", ["model", "role"], registry=r)
        self.time_to_serve_phase = Gauge("mx_time_to_serve_phase_seconds", "Time to serve by phase: weights (to "
                                         "release), cache_install, engine (release or install to ready: compile, "
                                         "profiling, graph capture)", ["model", "phase"], registry=r)
        self.ready = False
        self.healthy = True

    def set_role(self, model: str, role: str) -> None:
        for r in ROLES:
            self.role.labels(model, r).set(1 if r == role else 0)
        self.source_published.labels(model)  # 0 until published: "no live source" needs the zero

    def render(self) -> bytes:
        return generate_latest(self.registry)

