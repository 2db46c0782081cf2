"""deploy/: every overlay renders (kubectl kustomize), validates strictly against Kubernetes' own schemas
(kubernetes-validate, offline) and keeps the pod's contract; the Dockerfiles pass hadolint; the Redis ACL that
deploy/make-secrets.sh writes works on a real server with the real Coordinator.

No cluster is involved: what needs one is listed in README ("What was not validated without a cluster").
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from runtime_hooks.engines.vllm.compile_cache import model_from_argv
from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.codec import PROTOCOL_VERSION
from sidecar.contract.messages import SourceRecord
from sidecar.coordinator import Coordinator
from sidecar.fleet import read_fleet
from sidecar.lab.embedded_redis import server_binary
from sidecar.redis_client import connect
from sidecar.settings import SETTINGS
from tests.tooling import (
    DEPLOY,
    OVERLAYS,
    compose,
    config_maps,
    docs,
    find,
    kustomize,
    run,
    tool,
    venv_tool,
)

# Settings the lead's security work adds to sidecar/config.py (reserved names, HELPERS-COMMON.md).
RESERVED_SETTINGS = {"MX_AUTH_KEY_FILE", "MX_REDIS_USERNAME", "MX_REDIS_PASSWORD_FILE", "MX_REDIS_TLS_CA_FILE",
                     "MX_REDIS_TLS_CERT_FILE", "MX_REDIS_TLS_KEY_FILE", "MX_ALLOW_TCP_HOOK"}
# Every opt-in component, in the order a kustomization lists them (redis-tls patches the bundled Redis; preflight
# copies the sidecar as the others left it, so it comes last).
COMPONENTS = ("redis", "redis-tls", "monitoring", "rdma", "preflight")
VARIANTS = [(o, ()) for o in OVERLAYS] + [("vllm", ("redis",)), ("vllm", ("monitoring",)), ("vllm", ("rdma",)),
                                          ("vllm", ("redis", "redis-tls")), ("vllm", ("preflight",)),
                                          ("vllm", ("redis", "redis-tls", "rdma", "preflight")), ("trtllm", COMPONENTS),
                                          ("example", ())]
# The API groups of a plain cluster: what deploy/base and every variant without components/monitoring may use.
BUILT_IN_API_VERSIONS = {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"}


def _ids(v: tuple[str, tuple[str, ...]]) -> str:
    return "+".join((v[0], *v[1]))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """Each variant rendered once: {id: (file, objects)}."""
    out = {}
    base = tmp_path_factory.mktemp("render")
    for overlay, comps in VARIANTS:
        vid = _ids((overlay, comps))
        if overlay == "example":  # README's user kustomization
            src = DEPLOY / "examples" / "my-llm"
        else:
            src = DEPLOY / "overlays" / overlay if not comps else compose(base / f"k-{vid}", overlay, comps)
        text = kustomize(src)
        path = base / f"{vid}.yaml"
        path.write_text(text)
        out[vid] = (path, docs(text))
    text = kustomize(DEPLOY / "base")  # what `kubectl apply -k deploy/base` would create
    (base / "base.yaml").write_text(text)
    out["base"] = (base / "base.yaml", docs(text))
    return out


def _pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objs, "Deployment", "llm")["spec"]["template"]


def _sidecar(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(c for c in _pod(objs)["spec"]["initContainers"] if c["name"] == "mx-sidecar")


def _engine(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(c for c in _pod(objs)["spec"]["containers"] if c["name"] == "engine")


def _env(objs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's effective plain environment: envFrom ConfigMaps, then env values."""
    cms = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(cms[src["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _mount(container: dict[str, Any], volume: str) -> str:
    paths = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] == volume]
    assert len(paths) == 1, f"{container['name']} mounts {volume} {len(paths)} times"
    return paths[0]


# ---------------------------------------------------------------- render + validate

@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_every_overlay_and_component_renders_with_exactly_the_objects_its_components_add(rendered, variant):
    _, objs = rendered[_ids(variant)]
    comps = variant[1]
    kinds = sorted(o["kind"] for o in objs)
    bundled = "redis" in comps
    assert kinds.count("Deployment") == 1 + bundled and kinds.count("NetworkPolicy") == 1 + bundled
    assert kinds.count("PodDisruptionBudget") == 1 and "Secret" not in kinds
    monitoring = "monitoring" in comps
    assert kinds.count("PodMonitor") == kinds.count("PrometheusRule") == int(monitoring)
    dashboards = [o for o in objs if o["kind"] == "ConfigMap" and "mx-sidecar.json" in o.get("data", {})]
    assert len(dashboards) == int(monitoring)


@pytest.mark.parametrize("variant", [("base", ()), *[v for v in VARIANTS if "monitoring" not in v[1]]], ids=_ids)
def test_the_base_and_every_variant_without_monitoring_use_only_built_in_kinds(rendered, variant):
    # deploy/base must apply on a plain cluster: no Prometheus Operator CRD kinds, no other CRD group.
    _, objs = rendered[_ids(variant)]
    assert objs
    assert not [o["kind"] for o in objs if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {o["apiVersion"] for o in objs} <= BUILT_IN_API_VERSIONS, {o["apiVersion"] for o in objs}


def test_the_base_alone_holds_no_bundled_redis_and_points_at_an_existing_one_by_url_and_secret(rendered):
    _, objs = rendered["base"]
    assert {(o["kind"], o["metadata"]["name"]) for o in objs if o["kind"] != "ConfigMap"} == {
        ("Deployment", "llm"), ("PodDisruptionBudget", "llm"), ("NetworkPolicy", "mx-peers")}
    env = _env(objs, _sidecar(objs))
    assert urlsplit(env["MX_REDIS_URL"]).hostname not in ("mx-redis", None)
    vols = {v["name"]: v for v in _pod(objs)["spec"]["volumes"]}
    assert vols["mx-redis-auth"]["secret"]["items"] == [{"key": "password", "path": "password"}]
    assert env["MX_REDIS_PASSWORD_FILE"] == _mount(_sidecar(objs), "mx-redis-auth") + "/password"
    assert env["MX_REDIS_USERNAME"]


@pytest.mark.parametrize("k8s", ["1.30.0", "1.33.0"])
def test_the_base_alone_validates_strictly_against_the_kubernetes_schema(rendered, k8s):
    path, _ = rendered["base"]
    res = run([venv_tool("kubernetes-validate"), "--strict", "-k", k8s, str(path)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "passed for resource poddisruptionbudget/llm" in res.stdout + res.stderr


@pytest.mark.parametrize("k8s", ["1.30.0", "1.33.0"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_rendered_manifests_validate_strictly_against_the_kubernetes_schema(rendered, variant, k8s):
    path, _ = rendered[_ids(variant)]
    res = run([venv_tool("kubernetes-validate"), "--strict", "-k", k8s, str(path)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "passed for resource deployment/llm" in res.stdout + res.stderr


def test_strict_validation_rejects_an_unknown_field_and_a_native_sidecar_on_1_27(rendered, tmp_path):
    _, objs = rendered["vllm"]
    dep = copy.deepcopy(find(objs, "Deployment", "llm"))
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["gpuCount"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    res = run([venv_tool("kubernetes-validate"), "--strict", "-k", "1.33.0", str(tmp_path / "bad.yaml")])
    assert res.returncode != 0 and "gpuCount" in res.stdout + res.stderr
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(dep))  # restartPolicy on an init container needs >= 1.28
    res = run([venv_tool("kubernetes-validate"), "--strict", "-k", "1.27.0", str(tmp_path / "old.yaml")])
    assert res.returncode != 0 and "restartPolicy" in res.stdout + res.stderr


@pytest.mark.parametrize("k8s", ["1.30.0", "1.33.0"])
def test_the_plain_trtllm_examples_validate_strictly_and_carry_the_peer_label(k8s):
    files = sorted((DEPLOY / "examples" / "trtllm").glob("*.yaml"))
    assert len(files) == 3
    res = run([venv_tool("kubernetes-validate"), "--strict", "-k", k8s, *map(str, files)])
    assert res.returncode == 0, res.stdout + res.stderr
    for f in files:
        pod = find(docs(f.read_text()), "Deployment")["spec"]["template"]
        assert pod["metadata"]["labels"]["mx-sidecar.io/peer"] == "true", f"{f.name}: NetworkPolicy would block it"


# ---------------------------------------------------------------- the pod's contract

@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_the_sidecar_is_a_native_sidecar_sharing_the_socket_and_shm_volumes_with_the_engine(rendered, variant):
    _, objs = rendered[_ids(variant)]
    pod, side, eng = _pod(objs), _sidecar(objs), _engine(objs)
    assert side["restartPolicy"] == "Always", "native sidecar: an init container that keeps running"
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["mx-sockets"]["emptyDir"] is not None
    assert _mount(side, "mx-sockets") == _mount(eng, "mx-sockets")
    address = _env(objs, side)["MX_ZMQ_ADDRESS"]
    assert address == _env(objs, eng)["MX_ZMQ_ADDRESS"], "hook and sidecar must agree on the socket"
    assert address.startswith("ipc://" + _mount(side, "mx-sockets") + "/")
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory" and vols["dshm"]["emptyDir"]["sizeLimit"]
    assert _mount(side, "dshm") == _mount(eng, "dshm") == "/dev/shm"
    assert pod["spec"]["shareProcessNamespace"] is True, "CUDA IPC across PID namespaces fails"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] in ("vllm", "example")], ids=_ids)
def test_vllm_pods_share_the_compile_cache_root_and_the_sidecar_watches_the_engines_health(rendered, variant):
    _, objs = rendered[_ids(variant)]
    side, eng = _sidecar(objs), _engine(objs)
    env_s, env_e = _env(objs, side), _env(objs, eng)
    root = env_e["MX_COMPILE_CACHE_DIR"]
    assert env_e["VLLM_CACHE_ROOT"] == root == env_s["MX_COMPILE_CACHE_DIR"], "vLLM must find what is installed"
    assert env_e["TRITON_CACHE_DIR"].startswith(root + "/"), "Triton's kernels travel only inside the root"
    vols = {v["name"]: v for v in _pod(objs)["spec"]["volumes"]}
    shared = [m["name"] for m in eng["volumeMounts"] if m["mountPath"] == root]
    assert shared and _mount(side, shared[0]) == root and "emptyDir" in vols[shared[0]]
    assert not any(m.get("readOnly") for c in (side, eng) for m in c["volumeMounts"] if m["name"] == shared[0])
    port = next(p["containerPort"] for p in eng["ports"] if p["name"] == "http")
    assert env_s["MX_ENGINE_READY_URL"] == f"http://127.0.0.1:{port}{eng['readinessProbe']['httpGet']['path']}"
    argv = [*eng.get("command", []), *eng.get("args", [])]
    assert model_from_argv(argv), f"the plugin finds no model in {argv}: modelinfos/ are not asked for ahead"


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_sidecar_probes_use_readyz_and_healthz_and_the_startup_probe_never_waits_for_the_engine(rendered, variant):
    _, objs = rendered[_ids(variant)]
    side = _sidecar(objs)
    port = next(p for p in side["ports"] if p["name"] == "mx-metrics")
    assert str(port["containerPort"]) == _env(objs, side)["MX_METRICS_PORT"]
    assert side["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "mx-metrics"}
    assert side["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "mx-metrics"}
    # A native sidecar's startup probe gates the engine's start; /readyz needs the engine: it would deadlock.
    assert side["startupProbe"]["httpGet"]["path"] == "/healthz"
    if variant[0] != "trtllm":  # the TRT-LLM publisher serves files, no HTTP: the sidecar's /readyz is the pod's
        assert _engine(objs)["readinessProbe"]["httpGet"]["path"] == "/health"


def _grace_covers_the_drain(pod: dict[str, Any], env: dict[str, str], where: str) -> None:
    # A SIGTERM mid-receive waits for the READ drain (bounded by MX_STALL_TIMEOUT) before it aborts; a grace period
    # shorter than that makes the kubelet's SIGKILL end it: still safe (no verdict), only slower to recover.
    grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
    stall = float(env.get("MX_STALL_TIMEOUT", "30"))
    assert grace >= stall + 10, f"{where}: terminationGracePeriodSeconds {grace} < MX_STALL_TIMEOUT {stall:.0f} + 10"


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_the_grace_period_covers_a_read_drain_after_sigterm(rendered, variant):
    _, objs = rendered[_ids(variant)]
    _grace_covers_the_drain(_pod(objs), _env(objs, _sidecar(objs)), _ids(variant))


def test_the_trtllm_examples_grace_periods_cover_a_read_drain_after_sigterm():
    for f in sorted((DEPLOY / "examples" / "trtllm").glob("*.yaml")):
        pod = find(docs(f.read_text()), "Deployment")["spec"]["template"]
        env = {e["name"]: e["value"] for c in pod["spec"].get("containers", []) + pod["spec"].get("initContainers", [])
               for e in c.get("env", []) if "value" in e}
        _grace_covers_the_drain(pod, env, f.name)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_the_sidecar_requests_no_gpu_and_sees_the_engines_gpus_through_the_nvidia_runtime(rendered, variant):
    _, objs = rendered[_ids(variant)]
    side, eng = _sidecar(objs), _engine(objs)
    res = side["resources"]
    asked = [k for part in ("requests", "limits") for k in res.get(part, {})]
    assert not [k for k in asked if "gpu" in k.lower()], asked
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    assert "cpu" not in res["limits"], "a CPU limit throttles NIXL progress and heartbeats"
    env = _env(objs, side)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and "compute" in env["NVIDIA_DRIVER_CAPABILITIES"]
    assert int(eng["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert eng["image"] != "engine" and "/" in eng["image"], "every image is resolved to a registry path"


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_no_secret_is_inline_and_every_secret_file_is_a_mounted_secret(rendered, variant):
    _, objs = rendered[_ids(variant)]
    assert not [o for o in objs if o["kind"] == "Secret"]
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY($|_)")
    for cm in config_maps(objs).values():
        for k in cm:
            assert not secretish.search(k) or k.endswith("_FILE"), f"{k} looks like an inline secret"
    side = _sidecar(objs)
    for c in [side, _engine(objs)]:
        for e in c.get("env", []):
            assert not secretish.search(e["name"]) or e["name"].endswith("_FILE") or "value" not in e, e
    env = _env(objs, side)
    assert "@" not in urlsplit(env["MX_REDIS_URL"]).netloc, "credentials in the Redis URL"
    secret_vols = {v["name"]: v["secret"]["secretName"] for v in _pod(objs)["spec"]["volumes"] if "secret" in v}
    mounted = {m["mountPath"]: secret_vols[m["name"]] for m in side["volumeMounts"] if m["name"] in secret_vols}
    files = {k: v for k, v in env.items() if k.endswith("_FILE")}
    assert {"MX_REDIS_PASSWORD_FILE", "MX_AUTH_KEY_FILE"} <= set(files)
    for k, path in files.items():
        assert any(path.startswith(m + "/") for m in mounted), f"{k}={path} is not in a mounted Secret"
    assert set(mounted.values()) >= {"mx-redis-auth", "mx-auth-key"}
    # The hook checks a MAC on every command with the same key; the Redis credentials stay with the sidecar.
    eng = _engine(objs)
    eng_secrets = {secret_vols[m["name"]]: m["mountPath"] for m in eng["volumeMounts"] if m["name"] in secret_vols}
    assert eng_secrets == {"mx-auth-key": _mount(side, "mx-auth-key")}
    assert _env(objs, eng)["MX_AUTH_KEY_FILE"] == env["MX_AUTH_KEY_FILE"]
    assert "MX_REDIS_PASSWORD_FILE" not in _env(objs, eng)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_containers_run_non_root_on_read_only_filesystems_without_privilege_escalation(rendered, variant):
    _, objs = rendered[_ids(variant)]
    pairs = [("llm", "mx-sidecar")] + ([("mx-redis", "redis")] if "redis" in variant[1] else [])
    for dep, cname in pairs:
        spec = find(objs, "Deployment", dep)["spec"]["template"]["spec"]
        c = next(x for x in spec.get("initContainers", []) + spec["containers"] if x["name"] == cname)
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and spec["securityContext"]["runAsNonRoot"] is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert set(sc["capabilities"].get("add", [])) <= {"IPC_LOCK"}
        assert spec["automountServiceAccountToken"] is False
    pod = _pod(objs)["spec"]
    assert pod["securityContext"]["runAsUser"] != 0
    # One UID for both: the hook's socket directory is private to its user.
    assert all("runAsUser" not in c.get("securityContext", {}) for c in pod["containers"] + pod["initContainers"])
    assert _engine(objs)["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_network_policies_admit_only_replicas_to_redis_and_to_the_pinned_ucx_ports(rendered, variant):
    _, objs = rendered[_ids(variant)]
    peer = {"mx-sidecar.io/peer": "true"}
    labels = _pod(objs)["metadata"]["labels"]
    assert peer.items() <= labels.items()
    lo, hi = (int(x) for x in _env(objs, _sidecar(objs))["UCX_TCP_PORT_RANGE"].split("-"))
    peers = find(objs, "NetworkPolicy", "mx-peers")["spec"]
    assert peers["podSelector"]["matchLabels"] == peer and peers["policyTypes"] == ["Ingress"]
    ucx = [r for r in peers["ingress"] if any(p.get("endPort") for p in r["ports"])]
    assert len(ucx) == 1 and ucx[0]["from"] == [{"podSelector": {"matchLabels": peer}}]
    assert ucx[0]["ports"] == [{"protocol": "TCP", "port": lo, "endPort": hi}]
    open_ports = {p["port"] for r in peers["ingress"] if "from" not in r for p in r["ports"]}
    api = set() if variant[0] == "trtllm" else {8000}  # the TRT-LLM publisher has no API
    assert open_ports == {9400} | api, "only metrics/probes and the engine's API are open to all"
    url = urlsplit(_env(objs, _sidecar(objs))["MX_REDIS_URL"])
    if "redis" not in variant[1]:  # an existing Redis: its own network rules
        assert not [o for o in objs if o["metadata"]["name"] == "mx-redis"] and url.hostname != "mx-redis"
        return
    red = find(objs, "NetworkPolicy", "mx-redis")["spec"]
    redis_pod = find(objs, "Deployment", "mx-redis")["spec"]["template"]["metadata"]["labels"]
    assert red["podSelector"]["matchLabels"].items() <= redis_pod.items()
    assert red["ingress"] == [{"from": [{"podSelector": {"matchLabels": peer}}],
                               "ports": [{"protocol": "TCP", "port": 6379}]}]
    assert url.port == 6379 and url.hostname == find(objs, "Service", "mx-redis")["metadata"]["name"]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if "monitoring" in v[1]], ids=_ids)
def test_the_pod_monitor_selects_the_replicas_and_the_sidecars_metrics_port(rendered, variant):
    _, objs = rendered[_ids(variant)]
    pm = find(objs, "PodMonitor", "mx-sidecar")["spec"]
    assert pm["selector"]["matchLabels"].items() <= _pod(objs)["metadata"]["labels"].items()
    assert [e["port"] for e in pm["podMetricsEndpoints"]] == ["mx-metrics"]


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_a_rollout_keeps_live_sources(rendered, variant):
    _, objs = rendered[_ids(variant)]
    dep = find(objs, "Deployment", "llm")["spec"]
    assert dep["selector"]["matchLabels"].items() <= dep["template"]["metadata"]["labels"].items()
    assert dep["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, "keep live sources during a rollout"


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_every_mx_setting_in_the_manifests_is_a_known_setting(rendered, variant):
    _, objs = rendered[_ids(variant)]
    known = {s.env for s in SETTINGS} | RESERVED_SETTINGS
    used = {k for c in (_sidecar(objs), _engine(objs)) for k in _env(objs, c) if k.startswith("MX_")}
    used |= {e["name"] for e in _sidecar(objs)["env"] if e["name"].startswith("MX_")}
    assert used and used <= known, sorted(used - known)


def test_the_users_example_sets_namespace_images_and_model_and_keeps_the_contract(rendered):
    _, objs = rendered["example"]
    assert {o["metadata"].get("namespace") for o in objs} == {"llm"}
    assert _sidecar(objs)["image"] == "registry.example.com/mx-sidecar:0.1.0"
    assert _engine(objs)["image"] == "registry.example.com/vllm-mx:v0.26.0-mx1"
    assert _env(objs, _sidecar(objs))["MX_MODEL_NAME"] == "qwen2.5-7b"
    assert find(objs, "Deployment", "llm")["spec"]["replicas"] == 4
    assert "--load-format" in _engine(objs)["args"] and _engine(objs)["args"][2] == "mx-sidecar"
    # Opt-ins stay off: no RDMA device, no bundled Redis, no CRD kinds; the Redis is the user's, by URL.
    assert not [k for k in _sidecar(objs)["resources"].get("limits", {}) if k.startswith("rdma/")]
    assert "UCX_TLS" not in _env(objs, _sidecar(objs))
    assert not [o for o in objs if o["metadata"]["name"] == "mx-redis" or o["kind"] == "PodMonitor"]
    assert urlsplit(_env(objs, _sidecar(objs))["MX_REDIS_URL"]).hostname == "redis.cache.svc.cluster.local"


def test_the_rdma_component_gives_the_rdma_device_and_ipc_lock_to_the_sidecar_only(rendered):
    _, objs = rendered["vllm+rdma"]
    side, eng = _sidecar(objs), _engine(objs)
    assert side["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert side["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert "rdma/rdma_shared_device_a" not in eng["resources"].get("limits", {})
    assert "rc" in _env(objs, side)["UCX_TLS"].split(",")


@pytest.mark.parametrize("variant", [v for v in VARIANTS if "preflight" in v[1]], ids=_ids)
def test_the_preflight_component_runs_the_doctor_once_before_the_sidecar_with_exactly_the_sidecars_settings(
        rendered, variant):
    _, objs = rendered[_ids(variant)]
    first, second = _pod(objs)["spec"]["initContainers"][:2]
    assert (first["name"], second["name"]) == ("mx-doctor", "mx-sidecar"), "init containers run in order"
    assert first["args"] == ["doctor"]
    # A one-shot init container: it must exit (0) before the sidecar starts; probes or ports would be refused.
    assert not {"restartPolicy", "startupProbe", "readinessProbe", "livenessProbe", "ports"} & set(first)
    for field in ("image", "env", "envFrom", "volumeMounts", "securityContext", "resources"):
        assert first[field] == second[field], f"the doctor must check what the sidecar uses: {field} differs"


def test_the_preflight_component_refuses_to_render_where_the_sidecar_is_not_the_first_init_container(tmp_path):
    # Its patch copies initContainers[0]: a layout it does not expect fails the render instead of checking another
    # container's settings.
    k = tmp_path / "k"
    base = kustomize(DEPLOY / "overlays" / "vllm")
    objs = docs(base)
    pod = _pod(objs)["spec"]
    pod["initContainers"].insert(0, {"name": "other", "image": "busybox", "args": ["true"]})
    k.mkdir()
    (k / "all.yaml").write_text(yaml.safe_dump_all(objs))
    rel = os.path.relpath(DEPLOY, k)
    (k / "kustomization.yaml").write_text("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                                          f"resources: [all.yaml]\ncomponents: [{rel}/components/preflight]\n")
    res = run([tool("kubectl"), "kustomize", str(k)])
    assert res.returncode != 0 and "test" in res.stderr.lower(), res.stderr


def test_the_redis_tls_component_switches_to_rediss_with_a_mounted_ca(rendered):
    _, objs = rendered["vllm+redis+redis-tls"]
    env = _env(objs, _sidecar(objs))
    assert env["MX_REDIS_URL"].startswith("rediss://")
    ca = env["MX_REDIS_TLS_CA_FILE"]
    assert _mount(_sidecar(objs), "mx-redis-tls") == str(Path(ca).parent)
    args = find(objs, "Deployment", "mx-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--port") + 1] == "0" and args[args.index("--tls-port") + 1] == "6379"
    assert "--aclfile" in args


# ---------------------------------------------------------------- availability: PDB, spread, probes, Service

def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("variant", [("base", ()), *VARIANTS], ids=_ids)
def test_a_pod_disruption_budget_lets_a_drain_take_at_most_one_replica_of_the_deployment(rendered, variant):
    _, objs = rendered[_ids(variant)]
    pdb = find(objs, "PodDisruptionBudget", "llm")["spec"]
    assert _selects(pdb["selector"], _pod(objs)["metadata"]["labels"])
    assert pdb["selector"] == find(objs, "Deployment", "llm")["spec"]["selector"], "exactly the Deployment's pods"
    replicas = find(objs, "Deployment", "llm")["spec"].get("replicas", 1)
    if "maxUnavailable" in pdb:
        assert pdb["maxUnavailable"] == 1
    else:  # minAvailable must leave a drain possible, or a node never empties
        assert 0 < int(pdb["minAvailable"]) < max(replicas, 2)


@pytest.mark.parametrize("variant", [("base", ()), *VARIANTS], ids=_ids)
def test_replicas_spread_across_nodes_without_ever_blocking_scheduling(rendered, variant):
    _, objs = rendered[_ids(variant)]
    pod = _pod(objs)
    spread = [c for c in pod["spec"]["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname"]
    assert len(spread) == 1, pod["spec"]["topologySpreadConstraints"]
    assert spread[0]["whenUnsatisfiable"] == "ScheduleAnyway", "DoNotSchedule would strand replicas on a full fleet"
    assert spread[0]["maxSkew"] == 1
    assert _selects(spread[0]["labelSelector"], pod["metadata"]["labels"])


def _readiness_probes(pod: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = pod["spec"]
    return [(c["name"], c["readinessProbe"]) for c in spec.get("initContainers", []) + spec["containers"]
            if "readinessProbe" in c]


def _probe_is_sane(name: str, probe: dict[str, Any]) -> None:
    # One slow answer must not take a ready replica out of its Service: at least 3 failures of 5 s periods.
    assert probe.get("periodSeconds", 10) >= 5, f"{name}: readiness every {probe.get('periodSeconds')} s"
    assert probe.get("failureThreshold", 3) >= 3, f"{name}: failureThreshold {probe.get('failureThreshold')}"
    assert probe.get("timeoutSeconds", 1) >= 2, f"{name}: timeoutSeconds {probe.get('timeoutSeconds', 1)}"


@pytest.mark.parametrize("variant", [("base", ()), *VARIANTS], ids=_ids)
def test_readiness_probes_tolerate_a_slow_answer(rendered, variant):
    _, objs = rendered[_ids(variant)]
    probes = _readiness_probes(_pod(objs))
    assert "mx-sidecar" in dict(probes)
    for name, probe in probes:
        _probe_is_sane(f"{_ids(variant)}/{name}", probe)


def test_the_trtllm_examples_readiness_probes_tolerate_a_slow_answer():
    seen = 0
    for f in sorted((DEPLOY / "examples" / "trtllm").glob("*.yaml")):
        for name, probe in _readiness_probes(find(docs(f.read_text()), "Deployment")["spec"]["template"]):
            _probe_is_sane(f"{f.name}/{name}", probe)
            seen += 1
    assert seen == 3


def test_the_probe_policy_rejects_the_old_two_second_single_failure_probe():
    with pytest.raises(AssertionError, match="readiness every 2 s"):
        _probe_is_sane("old", {"periodSeconds": 2, "failureThreshold": 1})
    with pytest.raises(AssertionError, match="failureThreshold 1"):
        _probe_is_sane("old", {"periodSeconds": 5, "failureThreshold": 1, "timeoutSeconds": 2})


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] != "trtllm"], ids=_ids)
def test_a_service_exposes_the_engines_api_port_of_the_replicas(rendered, variant):
    _, objs = rendered[_ids(variant)]
    svc = find(objs, "Service", "llm")["spec"]
    assert svc["selector"].items() <= _pod(objs)["metadata"]["labels"].items()
    names = {p["name"]: p["containerPort"] for p in _engine(objs)["ports"]}
    for port in svc["ports"]:
        assert port["targetPort"] in names, f"{port} names no port of the engine"
        assert port["port"] == names[port["targetPort"]]


def test_every_trtllm_example_sidecar_and_loader_carries_the_redis_credentials_of_the_base(rendered):
    _, objs = rendered["base"]
    base_env = _env(objs, _sidecar(objs))
    base_dir = _mount(_sidecar(objs), "mx-redis-auth")
    checked = 0
    for f in sorted((DEPLOY / "examples" / "trtllm").glob("*.yaml")):
        spec = find(docs(f.read_text()), "Deployment")["spec"]["template"]["spec"]
        secret_vols = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if "MX_REDIS_URL" not in env:
                continue
            assert env["MX_REDIS_USERNAME"] == base_env["MX_REDIS_USERNAME"], f"{f.name}/{c['name']}"
            assert env["MX_REDIS_PASSWORD_FILE"] == base_env["MX_REDIS_PASSWORD_FILE"], f"{f.name}/{c['name']}"
            vol = next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == base_dir)
            assert secret_vols[vol]["secretName"] == "mx-redis-auth"
            assert secret_vols[vol]["defaultMode"] == 288
            checked += 1
    assert checked == 3  # the publisher's sidecar and the two loaders


# ---------------------------------------------------------------- images

def test_the_dockerfiles_pass_hadolint():
    files = sorted(DEPLOY.glob("Dockerfile*"))
    assert len(files) >= 2
    res = run([venv_tool("hadolint"), "--no-color", *map(str, files)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_flags_a_careless_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\nRUN pip install redis\n")
    res = run([venv_tool("hadolint"), "--no-color", str(bad)])
    assert res.returncode != 0 and "DL3006" in res.stdout and "DL3013" in res.stdout


def test_the_sidecar_image_installs_with_the_exact_constraints():
    text = (DEPLOY / "Dockerfile.sidecar").read_text()
    assert "-c /src/constraints.txt" in text and "COPY constraints.txt" in text
    engine = (DEPLOY / "Dockerfile.engine").read_text()
    assert "constraints" not in engine.split("FROM", 1)[1], "the engine image keeps the engine's own versions"


# ---------------------------------------------------------------- the Redis ACL on a real server

def _secrets() -> dict[str, dict[str, str]]:
    res = subprocess.run([str(DEPLOY / "make-secrets.sh")], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "KUBECTL": tool("kubectl")})
    assert res.returncode == 0, res.stderr
    return {d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
            for d in docs(res.stdout)}


def test_make_secrets_prints_fresh_random_secrets_of_the_names_the_manifests_mount():
    a, b = _secrets(), _secrets()
    assert set(a) == {"mx-redis-auth", "mx-auth-key"}
    assert len(a["mx-auth-key"]["key"]) == 64 and a["mx-auth-key"]["key"] != b["mx-auth-key"]["key"]
    assert a["mx-redis-auth"]["password"] in a["mx-redis-auth"]["users.acl"]


def test_the_redis_acl_admits_the_sidecar_and_status_through_the_manifests_settings_and_nothing_else(tmp_path):
    sec = _secrets()["mx-redis-auth"]
    (tmp_path / "users.acl").write_text(sec["users.acl"] + "\n")
    (tmp_path / "password").write_text(sec["password"])
    sock = tmp_path / "r.sock"
    srv = subprocess.Popen([server_binary(), "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly",
                            "no", "--dir", str(tmp_path), "--aclfile", str(tmp_path / "users.acl")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        anon = redis.Redis(unix_socket_path=str(sock))
        with pytest.raises(redis.exceptions.AuthenticationError):
            anon.set("mx:x", 1)
        mx = redis.Redis(unix_socket_path=str(sock), username="mx", password=sec["password"])
        for forbidden in (lambda: mx.set("other:x", 1), mx.flushall, lambda: mx.config_get("*"), mx.keys):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        # The settings the manifests set (mx-sidecar ConfigMap + the mounted Secret file), read by the real code.
        env = {"MX_REDIS_URL": f"unix://{sock}", "MX_REDIS_USERNAME": "mx",
               "MX_REDIS_PASSWORD_FILE": str(tmp_path / "password")}
        asyncio.run(_sidecar_round(Config.from_env(env)))
        res = subprocess.run([sys.executable, "-m", "sidecar", "status", "--json"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, **env, "MX_LOG_LEVEL": "warning"})
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["unreadable"] == []
    finally:
        srv.terminate()
        srv.wait(5)


async def _sidecar_round(cfg: Config) -> None:
    """Every Redis command the sidecar issues (real Coordinator) and what `status` reads, under the ACL."""
    fp = "f" * 64
    keys = Keyring(b"k" * 32)
    a = Coordinator(connect(cfg), "mx", "node-1-a", "node-1", 5.0, 1 << 20, 1 << 20, keys)
    b = Coordinator(connect(cfg), "mx", "node-1-b", "node-1", 5.0, 1 << 20, 1 << 20, keys)
    r = connect(cfg)
    try:
        await a.ping()
        assert await a.try_seed(fp, 5.0) and not await b.try_seed(fp, 5.0)
        assert await a.renew_seed(fp, 5.0) and await b.seeder(fp) == "node-1-a"
        fleet = await read_fleet(r, "mx", keys=keys)
        assert [le.holder for m in fleet.models for le in m.leases] == ["node-1-a"]
        await a.put_agent("agent-a", b"meta")
        rec = SourceRecord(PROTOCOL_VERSION, "node-1-a", "node-1", "m", fp, [])
        await a.publish(rec, ["agent-a"])
        assert await a.heartbeat(fp, ["agent-a"])
        await a.release_seed(fp)
        cands = await b.live_sources(fp)
        assert [c.record.replica for c in cands] == ["node-1-a"]
        assert await b.get_agent("agent-a") == b"meta"
        await b.reader_delta(fp, "node-1-a", +1)
        fleet = await read_fleet(r, "mx", keys=keys)
        assert [(s.replica, s.readers, s.authenticated) for s in fleet.models[0].sources] == [("node-1-a", 1, "yes")]
        await a.withdraw(fp, ["agent-a"])
        assert await b.live_sources(fp) == []
    finally:
        await a.close()
        await b.close()
        await r.aclose()


# ---------------------------------------------------------------- the ports NetworkPolicy names are the real ones

def _listening(pid: int) -> set[tuple[str, int]]:
    """(protocol, port) of every listening TCP / bound UDP socket that process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            listening = f[3] == "0A" if proto.startswith("tcp") else True
            if f[9] in inodes and listening:
                out.add((proto.rstrip("6"), int(f[1].rsplit(":", 1)[1], 16)))
    return out


def test_sidecars_listen_only_on_the_metrics_port_and_the_pinned_ucx_range_while_moving_weights(rendered,
                                                                                                   replicas):
    _, objs = rendered["vllm"]
    ucx = _env(objs, _sidecar(objs))["UCX_TCP_PORT_RANGE"]
    lo, hi = (int(x) for x in ucx.split("-"))
    a = replicas("a", extra_env={"UCX_TCP_PORT_RANGE": ucx})
    a.engine_results()
    a.wait_serving()
    b = replicas("b", extra_env={"UCX_TCP_PORT_RANGE": ucx})
    assert b.engine_results()[0]["outcome"] == "received"  # NIXL really moved the bytes through those ports
    b.wait_serving()
    for rep in (a, b):
        ports = _listening(rep.sidecar.p.pid)
        ucx_ports = {p for proto, p in ports if proto == "tcp" and lo <= p <= hi}
        assert ucx_ports, f"{rep.name}: no UCX listener in {ucx}: {ports}"
        assert ports == {("tcp", rep.metrics_port)} | {("tcp", p) for p in ucx_ports}, ports
        assert _listening(rep.engine.p.pid) == set(), "the engine hook binds ipc:// only"


def test_every_manifest_mounts_the_deployment_key_so_that_others_cannot_read_it():
    # The sidecar refuses a key file others may read (sidecar.contract.auth.Keyring.from_file); a Secret volume's
    # default mode, 0644, would make the sidecar of every pod of such a manifest refuse to start.
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for vol in _walk_volumes(doc):
                secret = vol.get("secret") or {}
                if secret.get("secretName") == "mx-auth-key":
                    mode = secret.get("defaultMode", 0o644)
                    found.append((path.name, mode))
                    assert not mode & 0o027, f"{path}: mx-auth-key mounted with mode {mode:04o}"
    assert len(found) >= 4, found  # deploy/base and the three TRT-LLM examples


def _walk_volumes(node: object) -> list[dict]:  # type: ignore[type-arg]
    out: list[dict] = []  # type: ignore[type-arg]
    if isinstance(node, dict):
        vols = node.get("volumes")
        if isinstance(vols, list):
            out += [v for v in vols if isinstance(v, dict)]
        for v in node.values():
            out += _walk_volumes(v)
    elif isinstance(node, list):
        for v in node:
            out += _walk_volumes(v)
    return out
