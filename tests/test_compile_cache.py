"""Compile caches beside the weights, through real processes: sidecar daemons (each with its cache's own sidecar),
a real Redis, real NIXL file transfers and the engine's side of the exchange played by this test (the vLLM
plugin's part runs with real vLLM in tests/vllm/test_vllm_compile_cache.py)."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime_hooks.compile_cache import (
    CacheVerdict,
    Exchange,
    Stage,
    key_differences,
    key_file_name,
    parse_key_file_name,
    unit_of,
)
from runtime_hooks.engines.vllm.compile_cache import AHEAD_FILES, UNITS, model_from_argv
from sidecar.lab.embedded_redis import EmbeddedRedis
from sidecar.lab.replica_procs import Proc
from tests.test_end_to_end import _metric

MODEL = "tiny-llama"
KEY = {"vllm": "0.32.0", "config": "abc123", "torch": "2.13.0", "triton": "none", "arch": "x86_64-avx2"}
HASH = "29d6fdfa37d866d2"
FAST = {"MX_HEARTBEAT_INTERVAL": "0.5", "MX_SOURCE_TTL": "3", "MX_SEED_LEASE_TTL": "3", "MX_POLL_INTERVAL": "0.1",
        "MX_STALL_TIMEOUT": "20", "MX_COMPILE_CACHE_SETTLE": "0.5", "MX_METRICS_PORT": "0",
        "MX_METRICS_HOST": "127.0.0.1", "MX_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------- the pure parts

def test_a_unit_is_the_longest_leading_directory_a_pattern_matches_component_by_component():
    aot = f"torch_compile_cache/torch_aot_compile/{HASH}/rank_0_0/model"
    assert unit_of(aot, UNITS) == f"torch_compile_cache/torch_aot_compile/{HASH}"
    assert unit_of(f"torch_compile_cache/{HASH}/rank_0_0/backbone/x.py", UNITS) == f"torch_compile_cache/{HASH}"
    assert unit_of("modelinfos/llama.json", UNITS) == "modelinfos/llama.json"  # no pattern: the file alone


def test_a_key_is_the_name_of_its_key_file_and_its_differences_name_the_fields():
    name = key_file_name(KEY)
    assert name.startswith("mx-cache-key/") and parse_key_file_name(name) == KEY
    other = {**KEY, "config": "def456"}
    assert key_differences(other, KEY) == ["config: ours def456, source abc123"]
    assert parse_key_file_name("mx-cache-key/../x.json") is None
    with pytest.raises(ValueError):
        key_file_name({"Bad Field": "x"})


def test_an_engine_that_stops_waiting_abandons_its_request_and_a_late_verdict_is_not_its_answer(tmp_path):
    ex = Exchange(tmp_path)
    req = ex.request(MODEL, KEY, UNITS)
    assert ex.pending_request() == req
    assert ex.wait_verdict(req.token, 0.05) is None
    assert ex.abandoned(req.token) and ex.pending_request() is None
    ex.answer(CacheVerdict(1, "other", "none", "", [], [], 0, 0.0, time.time()))
    assert ex.wait_verdict(req.token, 0.05) is None


def test_the_model_asked_for_ahead_is_the_one_a_serve_or_model_argument_names_and_none_otherwise():
    assert model_from_argv(["vllm", "serve", "Qwen/Qwen3-8B", "--load-format", "mx"]) == "Qwen/Qwen3-8B"
    assert model_from_argv(["vllm", "serve", "--model", "/models/llama"]) == "/models/llama"
    assert model_from_argv(["engine.py", "--tp", "2", "--model=/m"]) == "/m"
    assert model_from_argv(["vllm", "serve", "--help"]) == ""
    assert model_from_argv(["python", "-c", "from multiprocessing.spawn import spawn_main"]) == ""


def test_a_request_without_a_stage_is_a_compile_request_and_an_unknown_stage_is_refused(tmp_path):
    import msgspec

    ex = Exchange(tmp_path)
    req = ex.request(MODEL, KEY, UNITS)
    raw = msgspec.json.decode((ex.dir / "request.json").read_bytes())
    del raw["stage"], raw["only"]  # what a plugin of the release before writes
    (ex.dir / "request.json").write_bytes(msgspec.json.encode(raw))
    assert ex.pending_request() == req
    (ex.dir / "request.json").write_bytes(msgspec.json.encode({**raw, "stage": "early"}))
    with pytest.raises(ValueError, match="stage"):
        ex.pending_request()
    with pytest.raises(ValueError, match="file pattern"):
        ex.request(MODEL, KEY, [], stage="ahead", only=["../etc/*"])


# ---------------------------------------------------------------- through real processes

@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    work = tmp_path_factory.mktemp("cc")
    key = work / "deployment.key"
    key.write_bytes(secrets.token_bytes(32))
    os.chmod(key, 0o600)
    with EmbeddedRedis() as r:
        yield {"work": work, "redis": r.url, "key": str(key), "procs": []}


def _sidecar(fleet: dict[str, object], name: str, keyed: bool = True,
             extra: dict[str, str] | None = None) -> tuple[Proc, Path]:
    work = fleet["work"]
    assert isinstance(work, Path)
    root = work / name / "cache"
    root.mkdir(parents=True)
    env = {**os.environ, **FAST, "MX_REDIS_URL": str(fleet["redis"]), "MX_ZMQ_ADDRESS": f"ipc://{work}/{name}.sock",
           "MX_COMPILE_CACHE_DIR": str(root), "MX_ENGINE_READY_URL": f"file://{root.parent}/ready",
           **({"MX_AUTH_KEY_FILE": str(fleet["key"])} if keyed else {}), **(extra or {})}
    p = Proc(f"{name}-sidecar", [sys.executable, "-m", "sidecar", "run"], env, work)
    procs = fleet["procs"]
    assert isinstance(procs, list)
    procs.append(p)
    ex = Exchange(root)
    deadline = time.monotonic() + 60
    while not ex.sidecar_announced():  # what the plugin checks before it asks
        assert time.monotonic() < deadline and p.p.poll() is None, "\n".join(p.lines[-20:])
        time.sleep(0.1)
    return p, root


def _compiled(root: Path, h: str = HASH, tag: bytes = b"") -> dict[str, bytes]:
    """What a compile leaves (the shape vLLM 0.32's AOT compile writes on CPU)."""
    files = {f"torch_compile_cache/torch_aot_compile/{h}/rank_0_0/model": b"graph" + tag + os.urandom(64),
             f"torch_compile_cache/torch_aot_compile/{h}/inductor_cache/gw/c1.main.so": os.urandom(4096),
             f"torch_compile_cache/torch_aot_compile/{h}/inductor_cache/gw/empty.marker": b"",
             "modelinfos/llama.json": b'{"architectures": ["LlamaForCausalLM"]}'}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _metrics(p: Proc) -> str:
    port = int(p.wait_for(r"metrics on http://[^:]+:(\d+)/metrics", 30).group(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


AHEAD_KEY = {"vllm": KEY["vllm"], "torch": KEY["torch"]}


def _ask_ahead(root: Path, key: dict[str, str] = AHEAD_KEY) -> CacheVerdict:
    return _ask(root, key, units=[], stage="ahead", only=AHEAD_FILES)


def _ask(root: Path, key: dict[str, str] = KEY, wait: float = 60, units: list[str] = UNITS,
         stage: Stage = "compile", only: list[str] | None = None) -> CacheVerdict:
    ex = Exchange(root)
    req = ex.request(MODEL, key, units, stage, only)
    v = ex.wait_verdict(req.token, wait)
    assert v is not None, "no verdict"
    return v


@pytest.fixture(scope="module")
def source(fleet: dict[str, object]) -> Iterator[tuple[Proc, Path, dict[str, bytes]]]:
    """A first replica: nothing to install, it compiles, serves, and publishes its cache."""
    p, root = _sidecar(fleet, "src")
    v = _ask(root)
    assert v.result == "none", v
    files = _compiled(root)
    (root.parent / "ready").touch()
    p.wait_for(r"phase=compile_cache_publish", 60)
    yield p, root, files
    for q in fleet["procs"]:  # type: ignore[attr-defined]
        q.stop()


def test_a_target_installs_the_live_cache_of_its_key_byte_for_byte_and_a_clean_start_counts_a_hit(fleet, source):
    _, _, files = source
    p, root = _sidecar(fleet, "hit")
    v = _ask(root)
    assert v.result == "installed", v
    assert v.installed == ["modelinfos/llama.json", f"torch_compile_cache/torch_aot_compile/{HASH}"]
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, rel
    assert not list(root.glob("mx-cache-key/*")), "the key file is the source's, never installed"
    (root.parent / "ready").touch()  # the engine compiled nothing beside it
    p.wait_for(r"compile cache: hit", 30)
    assert _metric(_metrics(p), "mx_compile_cache_total", model=MODEL, result="hit") == 1
    p.wait_for(r"phase=serve ", 10)
    assert _metric(_metrics(p), "mx_time_to_serve_phase_seconds", model=MODEL, phase="cache_install") > 0


def test_an_engine_that_compiles_anew_beside_the_installed_cache_counts_a_miss(fleet, source):
    p, root = _sidecar(fleet, "miss")
    assert _ask(root).result == "installed"
    _compiled(root, h="ffff0000ffff0000")  # vLLM's own hash differed: it compiled into a directory of its own
    (root.parent / "ready").touch()
    p.wait_for(r"compile cache: miss", 30)
    assert _metric(_metrics(p), "mx_compile_cache_total", model=MODEL, result="miss") == 1


def test_a_cache_of_another_key_is_never_installed_and_the_log_names_the_field(fleet, source):
    p, root = _sidecar(fleet, "mismatch")
    v = _ask(root, {**KEY, "config": "def456"})
    assert v.result == "mismatch" and "config: ours def456, source abc123" in v.detail, v
    assert not (root / "torch_compile_cache").exists() and not (root / "modelinfos").exists()
    p.wait_for(r"phase=compile_cache .*mismatch.*config: ours def456, source abc123", 10)
    assert _metric(_metrics(p), "mx_compile_cache_total", model=MODEL, result="mismatch") == 1


def test_without_a_deployment_key_no_cache_is_fetched_or_installed(fleet, source):
    p, root = _sidecar(fleet, "unsigned", keyed=False)
    v = _ask(root)
    assert v.result == "refused" and "MX_AUTH_KEY_FILE" in v.detail, v
    assert not (root / "torch_compile_cache").exists()
    assert _metric(_metrics(p), "mx_compile_cache_total", model=MODEL, result="refused") == 1


def test_a_cache_directory_already_in_the_root_is_left_as_it_is(fleet, source):
    p, root = _sidecar(fleet, "present")
    mine = _compiled(root, tag=b"-mine")
    v = _ask(root)
    assert v.result == "present" and v.installed == [], v
    for rel, data in mine.items():
        assert (root / rel).read_bytes() == data, f"{rel} was overwritten"
    assert _metric(_metrics(p), "mx_compile_cache_total", model=MODEL, result="present") == 1


def test_an_engine_that_stopped_waiting_gets_nothing_installed(fleet, source):
    p, root = _sidecar(fleet, "late", extra={"MX_TEST_FAILPOINTS": "cache_before_install=sleep:2"})
    ex = Exchange(root)
    req = ex.request(MODEL, KEY, UNITS)
    p.wait_for(r"compile cache: the engine asks", 30)
    assert ex.wait_verdict(req.token, 0.0) is None  # mid-fetch, the engine compiles on its own from here
    p.wait_for(r"phase=compile_cache .*failed.*stopped waiting", 60)
    assert not (root / "torch_compile_cache").exists(), "installed after the engine's own verdict"


def test_a_request_abandoned_at_once_is_never_installed(fleet, source):
    _, root = _sidecar(fleet, "gone")
    ex = Exchange(root)
    req = ex.request(MODEL, KEY, UNITS)
    assert ex.wait_verdict(req.token, 0.0) is None
    time.sleep(3)  # a dozen request polls of the sidecar, and a receive if one read the request in between
    v = ex.verdict()
    assert v is None or v.result == "failed", v  # unread: never answered; read mid-way: refused at the install
    assert not (root / "torch_compile_cache").exists()


def test_a_cache_source_killed_before_the_receive_leaves_nothing_installed_and_the_engine_compiles(fleet, source):
    key = {**KEY, "config": "killed"}
    src, root = _sidecar(fleet, "src-killed")
    assert _ask(root, key).result in ("none", "mismatch")  # the module's source has another key
    _compiled(root, h="aaaabbbbccccdddd")
    (root.parent / "ready").touch()
    src.wait_for(r"phase=compile_cache_publish", 60)
    child = int(src.wait_for(r"compile cache: its sidecar runs as process (\d+)", 5).group(1))
    _, tgt = _sidecar(fleet, "after-kill")
    os.kill(child, signal.SIGKILL)  # its sealed record stays in Redis until MX_SOURCE_TTL: the target finds it
    v = _ask(tgt, key)
    assert v.result == "failed" and "receive failed" in v.detail, v
    assert not (tgt / "torch_compile_cache").exists()


def test_asked_ahead_only_modelinfos_install_and_the_compile_request_gets_the_rest_of_that_one_receive(fleet, source):
    _, _, files = source
    p, root = _sidecar(fleet, "ahead")
    v = _ask_ahead(root)
    assert v.result == "installed" and v.files == ["modelinfos/llama.json"], v
    assert (root / "modelinfos/llama.json").read_bytes() == files["modelinfos/llama.json"]
    assert not (root / "torch_compile_cache").exists(), "only what was asked for ahead installs ahead"
    p.wait_for(r"phase=compile_cache_ahead .*installed.*kept for the engine's compile request", 10)
    v = _ask(root)
    assert v.result == "installed" and "received ahead" in v.detail, v
    assert v.installed == [f"torch_compile_cache/torch_aot_compile/{HASH}"]
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, rel
    assert not list((root / ".mx-exchange").glob("incoming-*")), "what was kept is used up"
    (root.parent / "ready").touch()
    p.wait_for(r"compile cache: hit", 30)
    p.wait_for(r"the engine kept the 1 files installed ahead", 10)
    text = _metrics(p)
    assert _metric(text, "mx_compile_cache_ahead_total", model=MODEL, result="used") == 1
    assert _metric(text, "mx_compile_cache_total", model=MODEL, result="hit") == 1
    assert _metric(text, "mx_time_to_serve_phase_seconds", model=MODEL, phase="cache_ahead") > 0


def test_asked_ahead_a_cache_of_another_config_gives_its_modelinfos_but_never_its_graphs(fleet, source):
    _, root = _sidecar(fleet, "ahead-other-config")
    assert _ask_ahead(root).result == "installed"
    v = _ask(root, {**KEY, "config": "def456"})
    assert v.result == "mismatch" and "config: ours def456, source abc123" in v.detail, v
    assert not (root / "torch_compile_cache").exists()
    assert not list((root / ".mx-exchange").glob("incoming-*")), "what was kept is dropped"


def test_asked_ahead_a_cache_of_another_torch_installs_nothing(fleet, source):
    p, root = _sidecar(fleet, "ahead-other-torch")
    v = _ask_ahead(root, {**AHEAD_KEY, "torch": "2.99.0"})
    assert v.result == "mismatch" and "torch: ours 2.99.0" in v.detail, v
    assert not (root / "modelinfos").exists()
    assert _metric(_metrics(p), "mx_compile_cache_ahead_total", model=MODEL, result="mismatch") == 1


def test_modelinfos_installed_ahead_that_the_engine_writes_again_count_as_rewritten(fleet, source):
    p, root = _sidecar(fleet, "ahead-rewritten")
    assert _ask_ahead(root).result == "installed"
    time.sleep(0.05)
    (root / "modelinfos/llama.json").write_bytes(b'{"hash": "its own"}')  # vLLM: the module hash was not its own
    (root.parent / "ready").touch()
    p.wait_for(r"1 of the 1 files installed ahead were written again", 30)
    assert _metric(_metrics(p), "mx_compile_cache_ahead_total", model=MODEL, result="rewritten") == 1
    assert not list((root / ".mx-exchange").glob("incoming-*")), "no compile request came: what was kept is dropped"
