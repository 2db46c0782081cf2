"""The GPU modules import and the checksum algorithm is pinned, on a machine without CUDA (CI)."""

from __future__ import annotations

import struct

import pytest


def test_modules_import_without_touching_cuda() -> None:
    import sidecar.memory.cuda as cm

    assert cm._driver is None  # nothing loaded libcuda at import
    ops = cm.CudaOps(3, warm=False)
    assert ops.mem_type == "VRAM" and ops.device_id == 3


def test_no_driver_means_no_devices() -> None:
    """Without cuda-bindings (CPU CI) or without libcuda, driver() raises CudaError and no GPU is visible."""
    import importlib.util

    import sidecar.memory.cuda as cm

    if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
        pytest.skip("cuda-bindings is installed here")
    with pytest.raises(cm.CudaError, match="cuda-bindings"):
        cm.driver()
    assert cm.visible_device_count() == 0
    assert cm._driver is None


def test_hook_module_imports() -> None:
    pytest.importorskip("torch")
    import runtime_hooks.cuda_ipc as ci

    assert callable(ci.export_cuda_tensors)


def test_reference_checksum_is_pinned() -> None:
    from sidecar.memory.cuda import reference_checksum

    assert reference_checksum(b"") == "mxs1:0:0000000000000000:00000000"
    # one word 0x04030201 at position 0 (weight 1); the 5th byte is a zero-padded word at position 1 (weight 2)
    assert reference_checksum(bytes([1, 2, 3, 4, 5])) == f"mxs1:5:{0x04030201 + 5:016x}:{(0x04030201 + 2 * 5):08x}"
    words = struct.pack("<2I", 0xFFFFFFFF, 7)
    p = (1 << 31) - 1
    assert reference_checksum(words) == f"mxs1:8:{0xFFFFFFFF + 7:016x}:{(0xFFFFFFFF % p + 2 * 7) % p:08x}"


def test_reference_checksum_is_position_sensitive() -> None:
    from sidecar.memory.cuda import reference_checksum

    a = struct.pack("<4I", 1, 2, 3, 4)
    b = struct.pack("<4I", 2, 1, 3, 4)
    assert reference_checksum(a) != reference_checksum(b)
    assert reference_checksum(a) != reference_checksum(a + b"\0")  # the length is part of it


def test_uuid_format() -> None:
    from sidecar.memory.cuda import _norm_uuid, format_uuid

    u = format_uuid(bytes(range(16)))
    assert u == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert _norm_uuid(u.upper()) == _norm_uuid(u[4:])


def test_preload_torch_runs_once() -> None:
    from sidecar.memory.cuda import preload_torch

    t1 = preload_torch()
    t2 = preload_torch()
    assert t1 is t2
    t1.join(60)


def test_batched_checksum_kernel_equals_the_reference_in_tritons_cpu_interpreter() -> None:
    """The kernel and its host-side plan on CPU memory (Triton's interpreter), where Triton is installed."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = """
import numpy as np, torch
from sidecar.memory.checksum_kernel import mxs1_blocks
from sidecar.memory.checksum import _P31, _format_checksum, combine_blocks, plan_blocks, reference_checksum
buf = torch.from_numpy(np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8))
raw, base, block = buf.numpy().tobytes(), buf.data_ptr(), 256
for items in ([(0, 4), (4, 1020), (1024, 4 * block), (8192, 4 * block + 4), (20000, 3 * 4 * block + 8)],
              [(0, 4), (4, 1020), (1024, 4 * block), (8192, 4 * block + 4), (20000, 3 * 4 * block + 8), (0, 1 << 16)]):
    meta, starts = plan_blocks([(base + o, n // 4) for o, n in items], block)
    assert meta.shape[1] % 2 == 0, meta.shape  # 16-byte aligned rows: one compiled variant of the kernel
    out = torch.empty(2 * meta.shape[1], dtype=torch.int64)
    t = torch.from_numpy(meta)
    mxs1_blocks[(meta.shape[1],)](t[0], t[1], t[2], out, P=_P31, BLOCK=block)
    s0, s1 = combine_blocks(out.numpy(), starts)
    got = [_format_checksum(n, int(a), int(b)) for (o, n), a, b in zip(items, s0, s1)]
    assert got == [reference_checksum(raw[o:o + n]) for o, n in items], got
print("ok", meta.shape[1])
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


def test_the_device_checksum_is_not_a_mac_a_crafted_three_word_edit_passes_it() -> None:
    # docs/SECURITY-NIXL.md says so: mxs1 catches corruption and blind writes, not a writer who knows it.
    from sidecar.memory.checksum import reference_checksum

    words = [1_000_000 + 7 * i for i in range(64)]
    i, j = 5, 20
    edited = list(words)
    k = 1234
    edited[i] += k
    edited[j] -= 2 * k
    edited[2 * j - i] += k  # word sum unchanged; position-weighted sum changes by k * (i - 2j + (2j - i)) = 0
    before, after = (struct.pack(f"<{len(w)}I", *w) for w in (words, edited))
    assert before != after
    assert reference_checksum(before) == reference_checksum(after)
    blind = bytearray(before)
    blind[40:44] = b"\x55\x55\x55\x55"  # a blind overwrite is caught
    assert reference_checksum(bytes(blind)) != reference_checksum(before)
