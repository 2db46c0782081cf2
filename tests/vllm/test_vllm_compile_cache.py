"""vLLM's compile cache travels beside the weights (real vLLM CPU with torch.compile, real sidecars and Redis):
a target installs the source's modelinfos/ before vLLM inspects the model class and its cache before vLLM compiles,
and vLLM loads them instead of inspecting and compiling; its tokens are plain vLLM's. The refusal paths (another key,
no deployment key, an engine that stopped waiting) are covered through real sidecars in tests/test_compile_cache.py."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm.model_executor")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

from sidecar.lab.embedded_redis import EmbeddedRedis  # noqa: E402
from tests.test_end_to_end import _metric  # noqa: E402
from tests.vllm.replica import VllmReplica  # noqa: E402
from tests.vllm.tiny_llama import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-cc")


@pytest.fixture(scope="module")
def fleet(work: Path) -> Iterator[dict[str, str]]:
    key = work / "deployment.key"
    key.write_bytes(secrets.token_bytes(32))
    os.chmod(key, 0o600)
    with EmbeddedRedis() as r:
        yield {"redis": r.url, "key": str(key)}


def _replica(made: list[VllmReplica], name: str, ckpt: Path, work: Path, fleet: dict[str, str],
             sidecar: bool = True, load_format: str = "mx-sidecar") -> tuple[VllmReplica, Path]:
    root = work / name / "vllm-cache"
    root.mkdir(parents=True)
    ready = work / name / "ready"
    env = {"VLLM_CACHE_ROOT": str(root), "MX_COMPILE_CACHE_DIR": str(root), "MX_ENGINE_READY_URL": f"file://{ready}",
           "MX_AUTH_KEY_FILE": fleet["key"], "MX_COMPILE_CACHE_SETTLE": "1", "MX_HEARTBEAT_INTERVAL": "1",
           "MX_SOURCE_TTL": "5"}
    r = VllmReplica(name, ckpt, work, fleet["redis"], extra_env=env, sidecar=sidecar, load_format=load_format,
                    engine_args=["--compile", "--ready-file", str(ready)])
    made.append(r)
    return r, root


@pytest.fixture(scope="module")
def made() -> Iterator[list[VllmReplica]]:
    out: list[VllmReplica] = []
    yield out
    for r in reversed(out):
        r.stop()


def test_a_target_installs_the_sources_compile_cache_before_vllm_compiles_and_the_sidecar_says_what_vllm_did(
        work, fleet, made):
    ckpt = make_tiny_llama(work / "tiny", "bfloat16")
    plain, _ = _replica(made, "plain", ckpt, work, fleet, sidecar=False, load_format="auto")
    plain_out = plain.result(600)
    src, src_root = _replica(made, "src", ckpt, work, fleet)
    src_out = src.result(600)
    assert src.sidecar is not None
    src.sidecar.wait_for(r"phase=compile_cache .*none", 60)
    src.sidecar.wait_for(r"phase=compile_cache_publish", 120)
    assert list((src_root / "torch_compile_cache").iterdir()), "vLLM compiled nothing on this build"

    tgt, tgt_root = _replica(made, "tgt", ckpt, work, fleet)
    tgt_out = tgt.result(600)
    assert tgt.outcomes(tgt_out) == ["received"]
    assert tgt_out["tokens"] == src_out["tokens"] == plain_out["tokens"]
    assert tgt.sidecar is not None
    # Ahead, before vLLM built its config: the source's modelinfos/ (vLLM's model-class inspection), which vLLM kept
    # (it rewrites one whose module hash is not its own); the graphs came with that one receive. (vLLM 0.32 sets up
    # its logging after plugins load: the engine's own line about it is lost in the first process.)
    tgt.sidecar.wait_for(r"phase=compile_cache_ahead .*installed", 10)
    tgt.sidecar.wait_for(r"phase=compile_cache .*installed.*received ahead", 10)
    tgt.engine.wait_for(r"mx: compile cache installed", 10)
    assert sorted(p.name for p in (tgt_root / "modelinfos").iterdir()) == \
        sorted(p.name for p in (src_root / "modelinfos").iterdir())
    tgt.sidecar.wait_for(r"compile cache: the engine kept the \d+ files installed ahead", 60)
    aot = "torch_compile_cache/torch_aot_compile"
    src_dirs = {p.name for p in (src_root / aot).iterdir()} if (src_root / aot).is_dir() else set()
    assert src_dirs <= {p.name for p in (tgt_root / aot).iterdir()}, "the source's graphs are in the target's root"
    # The sidecar's judgement agrees with vLLM's own account of the start: it loaded the installed graph (hit), or
    # it found it and compiled again (vLLM 0.32 on CPU: "load failure ... finalize_loading", a vLLM bug; the
    # kernels inside the cache are still reused).
    said = tgt.sidecar.wait_for(r"compile cache: (hit|miss)", 60).group(1)
    engine_log = "\n".join(tgt.engine.lines)
    loaded = "Directly load AOT compilation" in engine_log or "Directly load the compiled graph" in engine_log
    recompiled = "Compiling model again due to a load failure" in engine_log or "Compiling a graph" in engine_log
    assert loaded != recompiled, "vLLM's log says neither (or both): its messages changed"
    assert said == ("hit" if loaded else "miss"), f"sidecar says {said}, vLLM loaded={loaded}"
    m = tgt.sidecar.wait_for(r"metrics on http://[^:]+:(\d+)/metrics", 10)
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    model = next(line.split('model="')[1].split('"')[0] for line in text.splitlines()
                 if line.startswith("mx_compile_cache_total{"))
    assert _metric(text, "mx_compile_cache_total", model=model, result=said) == 1
    print(f"ready: plain {plain_out['ready_s']}s, source {src_out['ready_s']}s, target with cache "
          f"{tgt_out['ready_s']}s")
