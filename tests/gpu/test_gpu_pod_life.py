"""The pod's own life on a GPU: the engine restarts under its sidecar (CUDA IPC mappings of a dead process), a
failed receive falls back to storage (its IPC mappings closed first), and `mx-sidecar doctor`'s CUDA IPC check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from sidecar.lab.embedded_redis import EmbeddedRedis  # noqa: E402
from sidecar.lab.fallback_memory import corrupt_one_checksum  # noqa: E402
from sidecar.lab.replica_procs import Replica  # noqa: E402
from sidecar.lab.toy_engine import make_checkpoint  # noqa: E402

FAST = {"MX_HEARTBEAT_INTERVAL": "0.5", "MX_SOURCE_TTL": "3", "MX_STALL_TIMEOUT": "30"}
MEDIUM = {"hidden": 1024, "intermediate": 2816, "layers": 8, "vocab": 32000, "kv_heads_ratio": 1}


def test_doctor_reports_cuda_ipc_between_two_processes_as_ok_on_a_gpu_machine() -> None:
    out = subprocess.run([sys.executable, "-m", "sidecar", "doctor", "--json"], capture_output=True, text=True,
                         timeout=300)
    gpu = [json.loads(line) for line in out.stdout.splitlines() if '"name": "gpu"' in line]
    assert gpu and gpu[0]["status"] == "ok" and "CUDA IPC between processes works" in gpu[0]["detail"], out.stdout


def test_a_gpu_engine_restarted_under_a_serving_sidecar_is_served_again_and_a_target_gets_its_bytes(env) -> None:
    url, ckpt, work = env
    src = Replica("src", ckpt, url, work, tp=2, extra_env=FAST, devices="cuda:0")
    try:
        ref = src.engine_results(timeout=120)
        src.wait_serving(timeout=120)
        assert src.sidecar is not None
        mark = len(src.sidecar.lines)
        src.restart_engine()
        src.sidecar.wait_for(r"the engine restarted .*life starts over", 60, after=mark)
        again = src.engine_results(timeout=120)
        assert [again[r]["outcome"] for r in (0, 1)] == ["loaded", "loaded"]
        src.sidecar.wait_for(r"serving as a source", 60, after=mark)
        tgt = Replica("tgt", ckpt, url, work, tp=2, extra_env=FAST, devices="cuda:0")
        try:
            res = tgt.engine_results(timeout=180)
            assert all(res[r]["outcome"] == "received" and res[r]["digests"] == ref[r]["digests"] for r in (0, 1))
        finally:
            tgt.stop()
    finally:
        src.stop()


def _peak_device_bytes(stop: threading.Event, peak: list[int]) -> None:
    _, total = torch.cuda.mem_get_info(0)
    while not stop.wait(0.01):
        free, _ = torch.cuda.mem_get_info(0)
        peak[0] = max(peak[0], total - free)


@pytest.mark.parametrize("keep_mapped", [False, True])
def test_a_failed_gpu_receive_falls_back_to_storage_with_the_checkpoints_bytes(tmp_path: Path, keep_mapped: bool):
    """Correctness on a GPU, and the device memory peak of the fallback, written to $OUT (measured, not asserted:
    torch's caching allocator may reuse the blocks our mapping keeps)."""
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, MEDIUM)
    with EmbeddedRedis() as r:
        model = f"gpu-fallback-{keep_mapped}"
        src = Replica("src", ckpt, r.url, tmp_path, tp=2, extra_env=FAST, devices="cuda:0", model_id=model)
        try:
            ref = src.engine_results(timeout=120)
            src.wait_serving(timeout=120)
            corrupt_one_checksum(r.url, model)
            torch.cuda.init()
            base = torch.cuda.mem_get_info(0)[1] - torch.cuda.mem_get_info(0)[0]
            env = {**FAST, **({"MX_TEST_FAILPOINTS": "release_attempt=raise"} if keep_mapped else {})}
            stop, peak = threading.Event(), [base]
            sampler = threading.Thread(target=_peak_device_bytes, args=(stop, peak), daemon=True)
            sampler.start()
            tgt = Replica("tgt", ckpt, r.url, tmp_path, tp=2, extra_env=env, devices="cuda:0", model_id=model,
                          engine_args=["--rebuild-on-retry"])
            try:
                res = tgt.engine_results(timeout=180)
                tgt.wait_serving(timeout=120)
            finally:
                stop.set()
                sampler.join()
                tgt.stop()
            assert all(res[r]["outcome"] == "loaded" and res[r]["digests"] == ref[r]["digests"] for r in (0, 1))
            model_bytes = sum(res[r]["bytes"] for r in res)
            if os.environ.get("OUT"):
                path = Path(os.environ["OUT"]) / "gpu_fallback_memory.jsonl"
                with path.open("a") as f:
                    f.write(json.dumps({"keep_mapped": keep_mapped, "model_bytes": model_bytes,
                                        "peak_above_start_bytes": peak[0] - base,
                                        "peak_over_model": round((peak[0] - base) / model_bytes, 3)}) + "\n")
        finally:
            src.stop()
