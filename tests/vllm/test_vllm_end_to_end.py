"""vLLM (CPU build) with `load_format="mx"`, as real processes: vLLM engines, sidecars, a real Redis (valkey).

Each replica = `python -m tests.vllm.engine` (vLLM V1, its own engine-core and worker processes) + `python -m
sidecar run`. Equality is proven by outputs (greedy tokens) and by per-tensor digests taken inside the workers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

# Not just "vllm": without vLLM installed, pytest's rootdir on sys.path makes tests/vllm a namespace package.
pytest.importorskip("vllm.model_executor")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

from sidecar.lab.embedded_redis import EmbeddedRedis  # noqa: E402
from tests.vllm.replica import REPO, VllmReplica  # noqa: E402
from tests.vllm.tiny_llama import make_tiny_llama  # noqa: E402

SIDECAR_TIMEOUT = 3


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-e2e")


@pytest.fixture(scope="module")
def ckpt(work: Path) -> Path:
    return make_tiny_llama(work / "tiny-bf16", "bfloat16")


@pytest.fixture(scope="module")
def ckpt_fp32(work: Path) -> Path:
    return make_tiny_llama(work / "tiny-fp32", "float32")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with EmbeddedRedis() as r:
        yield r.url


@pytest.fixture(scope="module")
def replicas(work: Path) -> Iterator[list[VllmReplica]]:
    made: list[VllmReplica] = []
    yield made
    for r in reversed(made):
        r.stop()


def _start(made: list[VllmReplica], *args: object, **kw: object) -> VllmReplica:
    r = VllmReplica(*args, **kw)  # type: ignore[arg-type]
    made.append(r)
    return r


@pytest.fixture(scope="module")
def plain_tokens(ckpt: Path, work: Path, replicas: list[VllmReplica]) -> list[int]:
    """Plain vLLM, its default loader, no plugin in the path: the reference output."""
    r = _start(replicas, "plain", ckpt, work, load_format="auto", sidecar=False,
               engine_args=["--exit-after-ready", "--no-digests"])
    return r.result()["tokens"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def lonely(ckpt: Path, work: Path, replicas: list[VllmReplica]) -> VllmReplica:
    """`--load-format mx` with no sidecar at all; it also runs the adapter's steps inside its worker."""
    return _start(replicas, "lonely", ckpt, work, sidecar=False,
                  extra_env={"MX_SIDECAR_TIMEOUT": str(SIDECAR_TIMEOUT)},
                  engine_args=["--exit-after-ready", "--check", "adapter_steps"])


@pytest.fixture(scope="module")
def source(ckpt: Path, work: Path, redis_url: str, replicas: list[VllmReplica]) -> tuple[VllmReplica, dict]:
    a = _start(replicas, "a", ckpt, work, redis_url)
    res = a.result()
    a.wait_serving()
    return a, res


def test_without_a_sidecar_vllm_starts_from_storage_within_the_timeout_and_says_so(lonely, plain_tokens):
    res = lonely.result()
    assert lonely.outcomes(res) == ["loaded_without_sidecar"]
    assert res["tokens"] == plain_tokens
    lonely.engine.wait_for(rf"rank 0: no sidecar answered for {SIDECAR_TIMEOUT}s; loading from storage", 1)


def test_a_vllm_lacking_what_the_plugin_uses_starts_from_storage_with_its_default_loader_and_says_so(
        ckpt, work, replicas, plain_tokens):
    # In every process of this engine, vLLM's DummyModelLoader is gone after vLLM imported it for itself
    # (tests/vllm/hide_api/sitecustomize.py): the plugin registers, then hands the load to vLLM's default loader.
    hidden = "vllm.model_executor.model_loader.dummy_loader:DummyModelLoader"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "vllm" / "hide_api"),
                                          os.environ.get("PYTHONPATH", "")]),
           "MX_TEST_HIDE_VLLM_API": hidden, "MX_SIDECAR_TIMEOUT": "600"}
    r = _start(replicas, "hidden", ckpt, work, sidecar=False, extra_env=env, engine_args=["--exit-after-ready"])
    res = r.result()
    assert r.outcomes(res) == ["loaded_by_vllm"]
    assert res["tokens"] == plain_tokens
    lines = [ln for ln in r.engine.lines if "lacks what the mx loader needs" in ln]
    assert len(lines) == 1, lines
    assert "vllm.model_executor.model_loader.dummy_loader.DummyModelLoader" in lines[0]
    assert "vLLM 0." in lines[0] and "default loader reads storage" in lines[0]


def test_a_target_prepared_on_dummy_weights_has_exactly_the_source_layout_and_refreshes_after_receive(lonely):
    lonely.result()
    [check] = lonely.check()
    assert check["loader"] == "MxModelLoader"
    assert check["only_in_source"] == check["only_in_target"] == []
    assert check["same_layout"] and check["same_identity"] and check["same_fingerprint"]
    assert check["dummy_differs"], "the target must start from dummy weights, not real ones"
    assert check["equal_after_receive"] and check["equal_after_retry"]
    # The numbers vLLM derived into no tensor (KV-cache scale floats, ...) are the source's too.
    assert check["derived_count"] > 0 and check["derived_differing"] == [] and check["derived_equal_after_retry"]
    assert check["zero_byte"], "zero-byte tensors (vLLM's kv_cache placeholders) are part of the manifest"
    assert any(n.endswith("rotary_emb.cos_sin_cache") for n in check["names"]), "buffers are exposed"
    assert any(n.endswith("attn._k_scale") for n in check["names"]), "tensor attributes are exposed"


def test_second_replica_receives_the_first_ones_weights_and_generates_identical_tokens(
        source, ckpt, work, redis_url, replicas, plain_tokens):
    a, res_a = source
    assert a.outcomes(res_a) == ["loaded"]
    b = _start(replicas, "b", ckpt, work, redis_url)
    res_b = b.result()
    assert b.outcomes(res_b) == ["received"]
    assert res_b["tokens"] == res_a["tokens"] == plain_tokens
    assert res_b["ranks"]["0"]["digests"] == res_a["ranks"]["0"]["digests"]
    assert res_b["ranks"]["0"]["tensors"] >= 25
    b.sidecar.wait_for(r"phase=verify \d+ checksums match", 10)
    b.stop()


def test_a_checkpoint_of_another_dtype_is_refused_as_target_and_loads_itself(
        source, ckpt_fp32, work, redis_url, replicas):
    # vLLM CPU would serve a float32 checkpoint in bfloat16 by default: ask for float32 explicitly.
    c = _start(replicas, "c", ckpt_fp32, work, redis_url, engine_args=["--dtype", "float32"])
    res_c = c.result()
    assert c.outcomes(res_c) == ["loaded"]
    c.sidecar.wait_for(r"phase=role .*: seed \(0 live sources\)", 10)
    assert not any("pulling" in line for line in c.sidecar.lines), "no transfer may even be attempted"
    assert next(iter(res_c["ranks"]["0"]["digests"].values())).startswith("torch.float32")
    c.stop()


def test_tensor_parallel_2_target_receives_each_rank_from_the_same_rank_of_the_source(
        ckpt, work, redis_url, replicas, plain_tokens):
    a = _start(replicas, "a2", ckpt, work, redis_url, tp=2)
    res_a = a.result()
    assert a.outcomes(res_a) == ["loaded", "loaded"]
    a.wait_serving()
    b = _start(replicas, "b2", ckpt, work, redis_url, tp=2)
    res_b = b.result()
    assert b.outcomes(res_b) == ["received", "received"]
    for r in ("0", "1"):
        assert res_b["ranks"][r]["digests"] == res_a["ranks"][r]["digests"]
    assert res_a["ranks"]["0"]["digests"] != res_a["ranks"]["1"]["digests"], "ranks hold different shards"
    assert res_b["tokens"] == res_a["tokens"] == plain_tokens
    b.stop()
    a.stop()


def test_a_source_and_a_replica_without_a_sidecar_read_storage_through_the_configured_vllm_loader(
        ckpt, work, redis_url, replicas, plain_tokens):
    # runai_streamer: one of vLLM's own storage loaders other than its default one, and one that runs on CPU.
    runai = ["--storage-load-format", "runai_streamer"]
    lonely = _start(replicas, "runai-lonely", ckpt, work, sidecar=False, engine_args=["--exit-after-ready", *runai],
                    extra_env={"MX_SIDECAR_TIMEOUT": str(SIDECAR_TIMEOUT)})
    # Its own Redis prefix: a source, not a target of the replicas above (the load format is not in the identity:
    # every loader gives the checkpoint's bytes).
    src = _start(replicas, "runai-src", ckpt, work, redis_url, engine_args=runai,
                 extra_env={"MX_REDIS_PREFIX": "runai"})
    for rep, outcome in ((lonely, "loaded_without_sidecar"), (src, "loaded")):
        res = rep.result()
        assert rep.outcomes(res) == [outcome]
        assert res["tokens"] == plain_tokens
        rep.engine.wait_for(r"rank 0 loaded from storage \(RunaiModelStreamerLoader\)", 5)
    src.wait_serving()
    src.stop()


def test_a_replica_whose_kernel_setting_differs_never_copies_and_its_log_names_the_setting(
        source, ckpt, work, redis_url, replicas, plain_tokens):
    source[0].wait_serving()
    d = _start(replicas, "deepgemm", ckpt, work, redis_url, extra_env={"VLLM_USE_DEEP_GEMM": "0"})
    res = d.result()
    assert d.outcomes(res) == ["loaded"] and res["tokens"] == plain_tokens
    line = d.sidecar.wait_for(r"under fingerprint \w+, not ours .*", 10).group(0)
    assert "extra.env.VLLM_USE_DEEP_GEMM: " in line and "!= (none)" in line, line
    assert "extra.kernels" not in line and "revision" not in line, "only the setting differs"
    d.stop()


# Last in this module: it changes the shared checkpoint in place.
def test_one_changed_weight_byte_in_place_is_a_new_checkpoint_that_loads_from_storage(
        source, ckpt, work, redis_url, replicas):
    a, res_a = source
    a.wait_serving()
    weights = ckpt / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:  # the last byte belongs to the last tensor's data; names, shapes, size unchanged
        f.seek(size - 1)
        old = f.read(1)
        f.seek(size - 1)
        f.write(bytes([old[0] ^ 0x01]))
    e = _start(replicas, "changed", ckpt, work, redis_url)
    res_e = e.result()
    assert e.outcomes(res_e) == ["loaded"], "a replica of the old bytes must not serve the new checkpoint"
    assert weights.stat().st_size == size
    line = e.sidecar.wait_for(r"under fingerprint \w+, not ours .*", 10).group(0)
    assert re.search(r"revision: local-\w+ != local-\w+", line), line
    assert res_e["ranks"]["0"]["digests"] != res_a["ranks"]["0"]["digests"], "the new bytes are served"
    e.stop()
