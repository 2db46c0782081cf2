"""File buffers: one uint8 tensor per file (POSIX shared memory on CPU, GPU memory otherwise), filled from disk
and read back in host-sized chunks with the SHA-256 taken on the way; and which device each rank's buffers use."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch

from runtime_hooks.files.errors import FilesError
from runtime_hooks.files.layout import LayoutError

CHUNK = 64 << 20

__all__ = ["CHUNK", "alloc_file_buffer", "digest_of", "host_chunks", "read_file_into", "resolve_devices",
           "usable_mem_types"]


def alloc_file_buffer(size: int, device: str) -> torch.Tensor:
    """A uint8 buffer for one file: in POSIX shared memory on CPU (moved there before any byte is written, so the
    hook never copies it again), in GPU memory otherwise."""
    if torch.device(device).type == "cpu" and size:
        # A fresh shared-memory storage (no copy of an uninitialised buffer: 2-3x faster than share-after-alloc).
        storage = torch.UntypedStorage._new_using_filename_cpu(size)  # type: ignore[attr-defined]
        return torch.empty(0, dtype=torch.uint8).set_(storage)
    return torch.empty(size, dtype=torch.uint8, device=device)


def host_chunks(t: torch.Tensor, chunk: int = CHUNK) -> Iterator[memoryview]:
    """The buffer's bytes in order, as host memory: views of the buffer itself on CPU, a pinned bounce buffer on GPU."""
    n = t.numel()
    if t.device.type == "cpu":
        mv = t.numpy().data.cast("B")
        for off in range(0, n, chunk):
            yield mv[off:off + chunk]
        return
    bounce = torch.empty(min(chunk, max(n, 1)), dtype=torch.uint8, pin_memory=True)
    bmv = bounce.numpy().data.cast("B")
    for off in range(0, n, chunk):
        k = min(chunk, n - off)
        bounce[:k].copy_(t[off:off + k])  # synchronous: the bytes are on the host when copy_ returns
        yield bmv[:k]


def read_file_into(path: Path, t: torch.Tensor, chunk: int = CHUNK) -> str:
    """Read `path` into `t` (exactly t.numel() bytes) and return its SHA-256, in one pass over the file."""
    h = hashlib.sha256()
    n = t.numel()
    with open(path, "rb", buffering=0) as f:
        if t.device.type == "cpu":
            mv = t.numpy().data.cast("B")
            off = 0
            while off < n:
                k = f.readinto(mv[off:off + chunk])
                if not k:
                    raise LayoutError(f"{path} shrank while it was read ({off} of {n} bytes)")
                h.update(mv[off:off + k])
                off += k
        else:
            bounce = torch.empty(min(chunk, max(n, 1)), dtype=torch.uint8, pin_memory=True)
            bmv = bounce.numpy().data.cast("B")
            off = 0
            while off < n:
                k = f.readinto(bmv[:min(chunk, n - off)])
                if not k:
                    raise LayoutError(f"{path} shrank while it was read ({off} of {n} bytes)")
                h.update(bmv[:k])
                t[off:off + k].copy_(bounce[:k])
                off += k
        if f.read(1):
            raise LayoutError(f"{path} grew while it was read (more than {n} bytes)")
    return h.hexdigest()


def digest_of(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    for mv in host_chunks(t):
        h.update(mv)
    return h.hexdigest()


def resolve_devices(setting: str, ranks: int, source_mem_type: str | None = None) -> list[str]:
    """One device per rank from MX_TRTLLM_DEVICES. `auto`: a publisher uses its GPUs if it has any; a target uses the
    memory kind its source serves from (part of the fingerprint)."""
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting == "auto":
        want_gpu = n_gpu > 0 if source_mem_type is None else source_mem_type == "VRAM"
        setting = "cuda" if want_gpu else "cpu"
    if setting == "cpu":
        return ["cpu"] * ranks
    if setting == "cuda":
        if not n_gpu:
            raise FilesError("MX_TRTLLM_DEVICES asks for CUDA (or the source serves from GPU memory) but this process "
                             "sees no CUDA device")
        return [f"cuda:{r % n_gpu}" for r in range(ranks)]
    listed = setting.split(",")
    return [listed[r % len(listed)] for r in range(ranks)]


def usable_mem_types(setting: str) -> set[str]:
    """Source memory kinds a target with this MX_TRTLLM_DEVICES can receive from (the fingerprint has the kind)."""
    if all(x == "cpu" for x in setting.split(",")):
        return {"DRAM"}
    if setting == "auto":
        return {"DRAM", "VRAM"} if torch.cuda.is_available() and torch.cuda.device_count() else {"DRAM"}
    return {"VRAM"}
