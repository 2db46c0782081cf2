"""CUDA IPC export (runtime_hooks.cuda_ipc) and sidecar GPU memory (sidecar.memory.cuda) on a real GPU.

Skipped without CUDA. Engines are real child processes (tests/gpu/gpu_procs.py): a process cannot open
its own IPC handles.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")]


class _Engine:
    def __init__(self, params: dict, env: dict | None = None, role: str = "engine") -> None:  # type: ignore[type-arg]
        from gpu_procs import Channel

        self.p = subprocess.Popen([sys.executable, os.path.join(HERE, "gpu_procs.py"), role],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
        assert self.p.stdin and self.p.stdout
        self.ch = Channel(self.p.stdout.fileno(), self.p.stdin.fileno())
        self.ch.send(params)
        self.reply = self.ch.recv()
        assert "error" not in self.reply or len(self.reply) > 1, self.reply.get("error")

    def digests(self) -> dict[str, str]:
        self.ch.send({"cmd": "digests"})
        return self.ch.recv()["digests"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        try:
            self.ch.send({"cmd": "exit"})
            self.ch.recv()
        except Exception:
            pass
        self.p.wait(20)


@pytest.fixture
def engine():  # type: ignore[no-untyped-def]
    e = _Engine({"device": 0, "fill": "random", "seed": 3, "layers": 2})
    yield e
    e.stop()


def _handles(reply: dict):  # type: ignore[no-untyped-def,type-arg]
    from sidecar.contract.messages import CudaIpcHandle

    return [CudaIpcHandle(u, h, n) for u, h, n in reply["handles"]]


def test_uuid_matches_torch_and_nvidia_smi_form() -> None:
    import torch

    from sidecar.memory.cuda import device_index_for_uuid, device_uuids

    for i, u in enumerate(device_uuids()):
        assert u.startswith("GPU-") and len(u) == 40
        assert u.removeprefix("GPU-") == str(torch.cuda.get_device_properties(i).uuid).removeprefix("GPU-")
        assert device_index_for_uuid(u) == i
        assert device_index_for_uuid(u.upper().replace("GPU-", "")) == i


def test_unknown_uuid_is_refused() -> None:
    from sidecar.contract.messages import CudaIpcHandle
    from sidecar.memory.cuda import device_index_for_uuid, import_cuda_ipc

    with pytest.raises(LookupError, match="not visible"):
        device_index_for_uuid("GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(LookupError):
        import_cuda_ipc(CudaIpcHandle("GPU-00000000-0000-0000-0000-000000000000", b"\0" * 64, 16))
    with pytest.raises(ValueError, match="64"):
        import_cuda_ipc(CudaIpcHandle("GPU-x", b"\0" * 10, 16))


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_device_checksum_equals_cpu_reference(offset: int) -> None:
    import torch

    from sidecar.memory.cuda import _CHUNK_WORDS, device_checksum, reference_checksum

    g = torch.Generator(device="cuda:0").manual_seed(offset)
    big = 4 * _CHUNK_WORDS + 13  # crosses the on-device chunk boundary, odd tail
    buf = torch.randint(0, 256, (big + 8,), dtype=torch.uint8, device="cuda:0", generator=g)
    host = buf.cpu().numpy().tobytes()
    for n in (0, 1, 3, 4, 5, 1023, 4096, (1 << 20) + 3, big):
        got = device_checksum(buf.data_ptr() + offset, n, 0)
        assert got == reference_checksum(host[offset:offset + n]), n
        assert got.startswith(f"mxs1:{n}:")


def test_batched_checksums_equal_the_cpu_reference_for_every_range_shape() -> None:
    import torch

    from sidecar.memory.cuda import _BLOCK_WORDS, CudaOps, device_checksum, device_checksums, reference_checksum

    blk = 4 * _BLOCK_WORDS
    big = 3 * blk + 4 * (1 << 20) + 7
    buf = torch.randint(0, 256, (big + 64,), dtype=torch.uint8, device="cuda:0",
                        generator=torch.Generator(device="cuda:0").manual_seed(5))
    host = buf.cpu().numpy().tobytes()
    shapes = [(0, 0), (0, 1), (0, 3), (0, 4), (8, 5), (16, 1023), (0, blk - 4), (0, blk), (4, blk + 3),
              (0, 3 * blk + 7), (1, 4096), (2, 4099), (3, 7), (0, big), (64, 4096), (64, 4096)]  # last two: same range
    items = [(buf.data_ptr() + off, n) for off, n in shapes]
    got = device_checksums(items, 0)
    assert got == [reference_checksum(host[off:off + n]) for off, n in shapes]
    assert got == [device_checksum(a, n, 0) for a, n in items]  # the per-range torch path agrees
    assert CudaOps(0).checksum_many(items) == got
    assert [CudaOps(0).checksum(a, n) for a, n in items] == got


def test_checksum_sees_swapped_words_and_single_bits() -> None:
    import torch

    from sidecar.memory.cuda import device_checksum

    t = torch.arange(1 << 16, dtype=torch.int32, device="cuda:0")
    base = device_checksum(t.data_ptr(), t.numel() * 4, 0)
    s = t.clone()
    s[[10, 20]] = s[[20, 10]]
    assert device_checksum(s.data_ptr(), s.numel() * 4, 0) != base
    f = t.clone()
    f[12345] ^= 1 << 7
    assert device_checksum(f.data_ptr(), f.numel() * 4, 0) != base


def test_alloc_and_copy_many() -> None:
    import torch

    from sidecar.memory.cuda import CudaOps, wrap_bytes

    ops = CudaOps(0)
    a, b = ops.alloc(1 << 24), ops.alloc(1 << 24)
    try:
        src = wrap_bytes(a.addr, a.nbytes, 0)
        src.copy_(torch.randint(0, 256, (a.nbytes,), dtype=torch.uint8, device="cuda:0"))
        torch.cuda.synchronize()
        # many pieces, odd sizes and offsets, reversed order into b
        pieces, off = [], 0
        while off < a.nbytes:
            n = min(4093 + (off % 7) * 511, a.nbytes - off)
            pieces.append((b.addr + off, a.addr + off, n))
            off += n
        ops.copy_many(pieces[::-1])
        assert torch.equal(wrap_bytes(b.addr, b.nbytes, 0), src)
        assert ops.checksum(a.addr, a.nbytes) == ops.checksum(b.addr, b.nbytes)
        ops.copy_many([])
        assert ops.alloc(0).addr == 0
    finally:
        a.close()
        b.close()
        a.close()  # idempotent


def test_export_import_read_write_across_processes(engine: _Engine) -> None:
    from gpu_procs import digest_raw

    from sidecar.memory.cuda import CudaOps, import_cuda_ipc

    r = engine.reply
    entries = r["entries"]
    assert len(r["handles"]) < len([e for e in entries if e[3]]), "one handle per segment, not per tensor"
    regions = [import_cuda_ipc(h) for h in _handles(r)]
    try:
        ops = CudaOps(regions[0].device_id)
        zero = [e for e in entries if e[3] == 0]
        assert zero and all(e[1] == -1 for e in zero)
        for name, hidx, off, nb in entries:
            if nb == 0:
                continue
            reg = regions[hidx]
            assert reg.mem_type == "VRAM" and off + nb <= reg.nbytes
            assert digest_raw(reg.addr + off, nb, reg.device_id) == r["digests"][name], name
            assert ops.checksum(reg.addr + off, nb) == r["checksums"][name], name
        # writes through the mapping land in the engine's tensors (the target path)
        name, hidx, off, nb = next(e for e in entries if e[0].endswith("o_proj.weight"))
        other = next(e for e in entries if e[0].endswith("q_proj.weight"))
        assert other[3] == nb
        ops.copy_many([(regions[hidx].addr + off, regions[other[1]].addr + other[2], nb)])
        after = engine.digests()
        assert after[name] == r["digests"][other[0]]
        assert all(after[k] == v for k, v in r["digests"].items() if k != name)
    finally:
        for reg in regions:
            reg.close()
            reg.close()


def test_same_handle_imported_twice_is_refcounted(engine: _Engine) -> None:
    """The driver reference-counts repeated opens of one handle in a process (sidecar.memory.cuda.CudaRegion)."""
    from gpu_procs import digest_raw

    from sidecar.memory.cuda import import_cuda_ipc

    h = _handles(engine.reply)[0]
    name, _hidx, off, nb = next(e for e in engine.reply["entries"] if e[1] == 0 and e[3])
    r1 = import_cuda_ipc(h)
    r2 = import_cuda_ipc(h)
    assert r1.addr == r2.addr
    r1.close()
    r1.close()  # idempotent: does not drop r2's mapping
    assert digest_raw(r2.addr + off, nb, r2.device_id) == engine.reply["digests"][name]  # r2 still mapped
    r2.close()


def test_handle_claiming_more_than_its_segment_is_refused(engine: _Engine) -> None:
    from sidecar.contract.messages import CudaIpcHandle
    from sidecar.memory.cuda import import_cuda_ipc

    h = _handles(engine.reply)[0]
    with pytest.raises(ValueError, match="allocation has only"):
        import_cuda_ipc(CudaIpcHandle(h.device_uuid, h.handle, 1 << 50))


def test_expandable_segments_are_refused_with_a_clear_error() -> None:
    e = _Engine({"device": 0}, env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, role="vmm")
    e.p.wait(30)
    assert e.reply["refused"], e.reply
    assert "expandable_segments" in e.reply["error"] and "legacy CUDA IPC" in e.reply["error"]


def test_build_manifest_uses_one_handle_per_segment() -> None:
    import torch

    from runtime_hooks.exposure import ModelIdentity, build_manifest, compute_fingerprint
    from sidecar.contract.messages import CudaIpcHandle, validate_manifest

    fused = torch.randn(3, 256, 256, device="cuda:0", dtype=torch.bfloat16)
    tensors = {f"l.{i}.w": torch.randn(64, 64, device="cuda:0") for i in range(20)}
    tensors.update({"q": fused[0], "k": fused[1], "v": fused[2], "empty": torch.empty(0, device="cuda:0"),
                    "scalar": torch.tensor(2.0, device="cuda:0"), "big": torch.empty(3 << 20, device="cuda:0")})
    ident = ModelIdentity("m", "r", "mixed", 0, 1)
    m = build_manifest(ident, compute_fingerprint(ident, tensors), tensors, expose=True)
    validate_manifest(m)
    assert m.memory_kind == "cuda_ipc"
    assert all(isinstance(h, CudaIpcHandle) and len(h.handle) == 64 for h in m.handles)
    assert len(m.handles) < len(m.tensors) - 1


def test_new_memory_at_a_freed_address_gets_a_new_ipc_handle() -> None:
    """What makes handles mapped ahead (sidecar.memory.prefetch) safe: an equal handle names the same allocation."""
    from sidecar.memory.cuda import driver

    d = driver()
    with d.on(0):
        first = d.mem_alloc(2 << 20)
        handle = d.ipc_get(first)
        d.mem_free(first)
        for _ in range(8):  # the driver hands the freed range out again; try a few times to land on it
            again = d.mem_alloc(2 << 20)
            new_handle = d.ipc_get(again)
            d.mem_free(again)
            if again == first:
                break
    assert again == first, "the driver did not reuse the freed address; nothing to compare"
    assert new_handle != handle
