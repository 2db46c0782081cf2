"""A Hugging Face model directory received file by file from a live publisher (publisher + sidecar, loader + sidecar,
real Redis and NIXL), byte-identical, then served by vLLM (CPU build) from the received directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm.model_executor")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

from sidecar.lab.embedded_redis import EmbeddedRedis  # noqa: E402
from tests.trtllm.checkpoints import digests  # noqa: E402
from tests.trtllm.procs import FilesNode  # noqa: E402
from tests.vllm.replica import VllmReplica  # noqa: E402
from tests.vllm.tiny_llama import make_tiny_llama  # noqa: E402


@pytest.fixture
def made(tmp_path: Path) -> Iterator[list[FilesNode | VllmReplica]]:
    procs: list[FilesNode | VllmReplica] = []
    yield procs
    for p in reversed(procs):
        p.stop()


def test_vllm_serves_a_model_directory_received_from_a_live_publisher_with_the_originals_tokens(made, tmp_path):
    src = make_tiny_llama(tmp_path / "tiny-llama", "bfloat16")
    with EmbeddedRedis() as redis_server:
        pub = FilesNode("pub", ["publish", str(src), "--model-name", "tiny-llama-files"], tmp_path, redis_server.url)
        made.append(pub)
        assert pub.result("MX_PUBLISHED")["form"] == "model-dir"
        assert pub.sidecar is not None
        pub.sidecar.wait_for(r"serving as a source", 60)
        out = tmp_path / "received"
        tgt = FilesNode("tgt", ["load", "--model-name", "tiny-llama-files", "--checkpoint-dir", str(out)], tmp_path,
                        redis_server.url)
        made.append(tgt)
        res = tgt.result("MX_LOADED")
        assert tgt.exit_code() == 0 and res["path"] == str(out)
    assert digests(out) == digests(src) and "model.safetensors" in digests(out)

    served = VllmReplica("served", out, tmp_path, load_format="auto", sidecar=False,
                         engine_args=["--exit-after-ready", "--no-digests"])
    made.append(served)
    tokens = served.result()["tokens"]
    original = VllmReplica("original", src, tmp_path, load_format="auto", sidecar=False,
                           engine_args=["--exit-after-ready", "--no-digests"])
    made.append(original)
    assert tokens == original.result()["tokens"] and len(tokens) == 16
