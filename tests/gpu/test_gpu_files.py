"""The file-level publisher's GPU path: a TRT-LLM checkpoint's rank files held in GPU memory (exported with CUDA IPC),
served by the sidecar through its staging ring, received by a loader into GPU memory, written byte-identical."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.timeout(240)]

from sidecar.lab.embedded_redis import EmbeddedRedis  # noqa: E402
from tests.trtllm.checkpoints import SMALL_CKPT, digests, make_trtllm_checkpoint  # noqa: E402
from tests.trtllm.procs import FilesNode  # noqa: E402


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with EmbeddedRedis() as r:
        yield r.url, tmp_path


def test_a_checkpoint_published_from_gpu_memory_arrives_byte_identical_in_a_gpu_loader(env) -> None:
    url, work = env
    ckpt = make_trtllm_checkpoint(work / "ckpt", 2, SMALL_CKPT)
    target_gpu = "cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0"
    ring = {"MX_SOURCE_MODE": "staged", "MX_STAGING_SLOT_BYTES": "1MiB", "MX_STAGING_SLOTS": "3",
            "MX_STALL_TIMEOUT": "60"}
    nodes: list[FilesNode] = []
    try:
        pub = FilesNode("pub", ["publish", str(ckpt), "--model-name", "gpu-files", "--devices", "cuda:0"], work, url,
                        ring)
        nodes.append(pub)
        published = pub.result("MX_PUBLISHED", 180)
        assert published["devices"] == ["cuda:0", "cuda:0"] and published["outcomes"] == ["loaded", "loaded"]
        assert pub.sidecar is not None
        pub.sidecar.wait_for(r"serving as a source", 120)
        out = work / "out"
        tgt = FilesNode("tgt", ["load", "--model-name", "gpu-files", "--output-dir", str(out), "--skip-build",
                                "--devices", target_gpu], work, url, ring)
        nodes.append(tgt)
        res = tgt.result("MX_LOADED", 180)
        assert tgt.exit_code(60) == 0
        assert res["devices"] == [target_gpu, target_gpu]
        assert digests(out / "checkpoint") == digests(ckpt)
        tgt.proc.wait_for(r"Found source with 2 workers .* GPU memory", 1)
        assert tgt.sidecar is not None
        tgt.sidecar.wait_for(r"phase=transfer .* staged", 1)
        tgt.sidecar.wait_for(r"checksums match", 1)
    finally:
        for n in reversed(nodes):
            n.stop()
