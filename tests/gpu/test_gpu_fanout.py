"""A burst on one GPU: four targets read one staging pass of a source through CUDA IPC (sidecar/lab/fanout.py).

One GPU holds the source and every target (all ranks on cuda:0): the carousel's correctness through CUDA IPC and
the staging copy rate are what one GPU can show; the 1 -> 4 time across GPUs needs a multi-GPU machine."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from sidecar.lab.fanout import burst  # noqa: E402
from sidecar.lab.toy_engine import make_checkpoint  # noqa: E402

MEDIUM = {"hidden": 1024, "intermediate": 2816, "layers": 8, "vocab": 32000, "kv_heads_ratio": 1}
RING = {"MX_STAGING_SLOT_BYTES": "4MiB", "MX_STAGING_SLOTS": "4", "MX_STALL_TIMEOUT": "60"}
READ_DELAY = 0.02  # s per READ: a pass of ~40 chunks lasts ~1 s, so targets that start together share it


def test_four_gpu_targets_read_one_staging_pass_through_cuda_ipc_and_hold_the_sources_bytes(env) -> None:
    url, _, work = env
    ckpt = work / "medium"
    make_checkpoint(ckpt, MEDIUM)
    one = burst(work, url, ckpt, 1, "staged", "carousel", READ_DELAY, timeout=300, devices="cuda:0", extra_env=RING)
    four = burst(work, url, ckpt, 4, "staged", "carousel", READ_DELAY, timeout=300, devices="cuda:0", extra_env=RING)
    out = Path(os.environ.get("OUT", ".gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_fanout.json").write_text(json.dumps({"one": one.__dict__, "four": four.__dict__,
                                                     "ratio": four.all_ready_s / one.all_ready_s}, indent=1))
    for b in (one, four):
        assert b.identical and b.outcomes == ["received"] * b.targets and b.storage_reads == 1, b
    # a pass fed several readers at once through the CUDA IPC-filled ring (how many joined it depends on start-up)
    assert any(re.search(r"for [2-9] readers", line) for line in four.pass_lines), four.pass_lines
