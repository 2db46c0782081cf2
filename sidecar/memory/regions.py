"""Map the engine's memory handles into the sidecar, and the per-kind operations on mapped memory.

A Region is a range of memory in this process: engine memory imported from a handle, or a buffer
the sidecar owns (a staging slot). MemoryOps copies between regions and checksums them, on the CPU
for DRAM and on the GPU (sidecar.memory.cuda) for VRAM.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence
from typing import Protocol

import xxhash

from sidecar.contract.messages import CudaIpcHandle, Handle, ShmHandle

SHM_DIR = "/dev/shm"


class Region(Protocol):
    addr: int
    nbytes: int
    mem_type: str  # NIXL memory type: "DRAM" or "VRAM"
    device_id: int

    def close(self) -> None: ...


class MemoryOps(Protocol):
    mem_type: str
    device_id: int

    def alloc(self, nbytes: int) -> Region: ...

    def copy_many(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """(dst_addr, src_addr, nbytes) triples; returns when all are complete."""
        ...

    def checksum(self, addr: int, nbytes: int) -> str: ...

    def checksum_many(self, items: Sequence[tuple[int, int]]) -> list[str]:
        """checksum() of each (addr, nbytes); on a GPU in one batched launch."""
        ...


class ShmRegion:
    """A POSIX shm file mapped read-write; only [offset, offset+nbytes) belongs to the engine's tensors."""

    mem_type = "DRAM"
    device_id = 0

    def __init__(self, h: ShmHandle) -> None:
        if "/" in h.name or h.name in ("", ".", ".."):
            raise ValueError(f"shm name {h.name!r} is not a plain file name")
        path = os.path.join(SHM_DIR, h.name)
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if h.offset < 0 or h.offset + h.nbytes > size:
                raise ValueError(f"{path}: handle [{h.offset}, {h.offset + h.nbytes}) exceeds file of {size} bytes")
            # MAP_POPULATE builds the page tables now: NIXL's CMA reads through this mapping, and faulting
            # 4 KiB pages inside the transfer instead cost a large share of its time.
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._anchor = ctypes.c_char.from_buffer(self._mm)
        self.addr = ctypes.addressof(self._anchor) + h.offset
        self.nbytes = h.nbytes

    def close(self) -> None:
        if self._mm.closed:
            return
        del self._anchor
        self._mm.close()


class HostBuffer:
    """Sidecar-owned DRAM (staging slot)."""

    mem_type = "DRAM"
    device_id = 0

    def __init__(self, nbytes: int) -> None:
        self._mm = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        self._anchor = ctypes.c_char.from_buffer(self._mm)
        self.addr = ctypes.addressof(self._anchor)
        self.nbytes = nbytes

    def close(self) -> None:
        if self._mm.closed:
            return
        del self._anchor
        self._mm.close()


def _view(addr: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")


class CpuOps:
    mem_type = "DRAM"
    device_id = 0

    def alloc(self, nbytes: int) -> Region:
        return HostBuffer(nbytes)

    def copy_many(self, copies: Sequence[tuple[int, int, int]]) -> None:
        for dst, src, n in copies:
            ctypes.memmove(dst, src, n)  # ctypes drops the GIL for the call

    def checksum(self, addr: int, nbytes: int) -> str:
        if nbytes == 0:
            return "xxh3:0"
        return "xxh3:" + xxhash.xxh3_64_hexdigest(_view(addr, nbytes))

    def checksum_many(self, items: Sequence[tuple[int, int]]) -> list[str]:
        return [self.checksum(a, n) for a, n in items]  # xxhash drops the GIL per call; no launches to batch


def import_handle(h: Handle) -> Region:
    if isinstance(h, ShmHandle):
        return ShmRegion(h)
    if isinstance(h, CudaIpcHandle):
        from sidecar.memory.cuda import import_cuda_ipc

        return import_cuda_ipc(h)  # type: ignore[no-any-return]
    raise TypeError(f"unknown handle type {type(h).__name__}")


def ops_for(region: Region) -> MemoryOps:
    if region.mem_type == "DRAM":
        return CpuOps()
    from sidecar.memory.cuda import CudaOps

    return CudaOps(region.device_id)  # type: ignore[no-any-return]
