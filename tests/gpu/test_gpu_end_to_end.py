"""GPU replicas through the real daemon: engines with CUDA tensors (CUDA IPC), sidecars with VRAM NIXL agents."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from sidecar.lab.replica_procs import Replica  # noqa: E402


def _devices() -> tuple[str, str]:
    if torch.cuda.device_count() >= 2:
        return "cuda:0,cuda:0", "cuda:1,cuda:1"  # source ranks on GPU 0, target ranks on GPU 1
    return "cuda:0", "cuda:0"


@pytest.mark.parametrize("mode", ["staged", "direct"])
def test_tp2_gpu_target_receives_identical_bytes_through_the_daemon(env, mode: str) -> None:
    url, ckpt, work = env
    src_dev, tgt_dev = _devices()
    extra = {"MX_SOURCE_MODE": mode, "MX_STAGING_SLOT_BYTES": "256KiB", "MX_STAGING_SLOTS": "3",
             "MX_VERIFY": "checksum", "MX_STALL_TIMEOUT": "60"}
    src = Replica("src", ckpt, url, work, tp=2, extra_env=extra, devices=src_dev)
    try:
        res_src = src.engine_results(timeout=120)
        src.wait_serving(timeout=120)
        tgt = Replica("tgt", ckpt, url, work, tp=2, extra_env=extra, devices=tgt_dev)
        try:
            res_tgt = tgt.engine_results(timeout=180)
            for r in (0, 1):
                assert res_tgt[r]["outcome"] == "received"
                assert res_tgt[r]["digests"] == res_src[r]["digests"]
            assert tgt.sidecar is not None
            tgt.sidecar.wait_for(rf"phase=transfer .*{mode}", 10)
            tgt.sidecar.wait_for(r"checksums match", 10)
        finally:
            tgt.stop()
    finally:
        src.stop()


def test_gpu_target_maps_handles_ahead_and_writes_only_the_final_tensors(env) -> None:
    """The engine moves tensors to new memory while it prepares: the handles mapped ahead for them are not used."""
    url, ckpt, work = env
    src_dev, tgt_dev = _devices()
    extra = {"MX_SOURCE_MODE": "staged", "MX_STAGING_SLOT_BYTES": "256KiB", "MX_STALL_TIMEOUT": "60"}
    src = Replica("src", ckpt, url, work, tp=1, extra_env=extra, devices=src_dev.split(",")[0])
    try:
        res_src = src.engine_results(timeout=120)
        src.wait_serving(timeout=120)
        tgt = Replica("tgt", ckpt, url, work, tp=1, extra_env=extra, devices=tgt_dev.split(",")[0],
                      engine_args=["--prepare-delay", "1", "--prepare-realloc", "6"])
        try:
            res_tgt = tgt.engine_results(timeout=180)
            assert res_tgt[0]["outcome"] == "received"
            assert res_tgt[0]["digests"] == res_src[0]["digests"]
            assert tgt.sidecar is not None
            m = tgt.sidecar.wait_for(r"import \S+ of (\d+) handles, (\d+) mapped ahead", 10)
            assert 0 < int(m.group(2)) <= int(m.group(1))
            tgt.sidecar.wait_for(r"phase=preconnect", 1)
        finally:
            tgt.stop()
    finally:
        src.stop()
