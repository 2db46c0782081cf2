"""GPU memory for the sidecar: import engine CUDA IPC handles, own staging buffers, copy (checksums: checksum.py).

Everything goes through the CUDA *driver* API via NVIDIA's cuda-bindings (`cuda.bindings.driver`, the `torch` extra;
on GPU images with torch), which releases the GIL during each driver call, so waiting on a stream does not stall
other Python threads. No pickle. Nothing here touches CUDA, or imports cuda-bindings, at import time: the module
imports on a machine without a GPU (CI), where driver() raises CudaError.

Facts relied on (CUDA driver API):
- cuIpcGetMemHandle / cuIpcOpenMemHandle work on whole cudaMalloc allocations ("segments"); the 64-byte
  CUipcMemHandle is the same as the runtime's cudaIpcMemHandle_t. Opening maps the *whole* segment.
- cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE) is 0 for CUDA VMM memory
  (PyTorch expandable_segments, cudaMallocAsync pools), which legacy IPC cannot export.
- cuMemGetAddressRange gives the base and size of the allocation that holds a pointer.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sidecar.memory.checksum import (  # noqa: F401  (re-exported: the GPU tests and benchmarks use these names)
    _BLOCK_WORDS,
    _CHUNK_WORDS,
    CHECKSUM_ALGO,
    combine_blocks,
    device_checksum,
    device_checksums,
    plan_blocks,
    preload_torch,
    reference_checksum,
    start_warm_up,
    warm_up,
    wrap_bytes,
)

CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1
CU_STREAM_NON_BLOCKING = 0x1
CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2
CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10
CU_MEMORYTYPE_DEVICE = 2
IPC_HANDLE_BYTES = 64


class CudaError(RuntimeError):
    pass


class _Driver:
    """The few driver entry points the sidecar and the hook need, on cuda.bindings.driver."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import driver as cu
        except ImportError as e:
            raise CudaError(f"cannot import cuda-bindings (the `torch` extra): {e}") from None
        self.cu = cu
        self._ok = cu.CUresult.CUDA_SUCCESS
        try:
            self.check(cu.cuInit(0), "cuInit")
        except RuntimeError as e:  # cuda-bindings raises where it cannot load libcuda.so.1
            raise CudaError(f"cannot initialise the CUDA driver: {e}") from None
        self._ctx: dict[int, Any] = {}
        self._lock = threading.Lock()

    def check(self, res: Any, what: str) -> Any:
        """cuda-bindings returns (CUresult, *values): raise on an error, else the value (or the tuple of them)."""
        err = res[0]
        if err != self._ok:
            e, text = self.cu.cuGetErrorString(err)
            msg = text.decode() if e == self._ok and text else "unknown error"
            raise CudaError(f"{what} failed: CUDA error {int(err)} ({getattr(err, 'name', err)}: {msg})")
        return res[1] if len(res) == 2 else res[1:]

    def device_count(self) -> int:
        return int(self.check(self.cu.cuDeviceGetCount(), "cuDeviceGetCount"))

    def uuid(self, ordinal: int) -> str:
        dev = self.check(self.cu.cuDeviceGet(ordinal), "cuDeviceGet")
        u = self.check(self.cu.cuDeviceGetUuid(dev), "cuDeviceGetUuid")
        return format_uuid(bytes(u.bytes))

    def primary_ctx(self, ordinal: int) -> Any:
        with self._lock:
            ctx = self._ctx.get(ordinal)
            if ctx is None:
                dev = self.check(self.cu.cuDeviceGet(ordinal), "cuDeviceGet")
                # The same context the CUDA runtime (and so torch) uses on that device; kept for the process.
                ctx = self._ctx[ordinal] = self.check(self.cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            return ctx

    @contextmanager
    def on(self, ordinal: int) -> Iterator[None]:
        """Make the device's primary context current on this thread for the block, then restore."""
        self.check(self.cu.cuCtxPushCurrent(self.primary_ctx(ordinal)), "cuCtxPushCurrent")
        try:
            yield
        finally:
            self.cu.cuCtxPopCurrent()

    def pointer_attr(self, ptr: int, attr: int) -> int:
        v = self.check(self.cu.cuPointerGetAttribute(self.cu.CUpointer_attribute(attr), ptr),
                       f"cuPointerGetAttribute({attr})")
        return int(getattr(v, "value", v))

    def address_range(self, ptr: int) -> tuple[int, int]:
        base, size = self.check(self.cu.cuMemGetAddressRange(ptr), "cuMemGetAddressRange")
        return int(base), int(size)

    def ipc_get(self, base: int) -> bytes:
        h = self.check(self.cu.cuIpcGetMemHandle(base), "cuIpcGetMemHandle")
        return bytes(h.reserved)[:IPC_HANDLE_BYTES]

    def ipc_open(self, handle: bytes) -> int:
        h = self.cu.CUipcMemHandle()
        h.reserved = handle
        return int(self.check(self.cu.cuIpcOpenMemHandle(h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle"))

    def ipc_close(self, ptr: int) -> None:
        self.check(self.cu.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")

    def mem_alloc(self, nbytes: int) -> int:
        return int(self.check(self.cu.cuMemAlloc(nbytes), f"cuMemAlloc({nbytes})"))

    def mem_free(self, ptr: int) -> None:
        self.check(self.cu.cuMemFree(ptr), "cuMemFree")

    def stream_create(self) -> Any:
        return self.check(self.cu.cuStreamCreate(CU_STREAM_NON_BLOCKING), "cuStreamCreate")

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self.check(self.cu.cuMemcpyAsync(dst, src, nbytes, stream), "cuMemcpyAsync")

    def read(self, src: int, nbytes: int) -> bytes:
        """A few bytes of device memory, synchronously (the context of `src`'s device must be current)."""
        buf = ctypes.create_string_buffer(nbytes)
        self.check(self.cu.cuMemcpyDtoH(ctypes.addressof(buf), src, nbytes), "cuMemcpyDtoH")
        return buf.raw

    def stream_sync(self, stream: Any) -> None:
        # cuda-bindings drops the GIL for the call: other threads (the event loop) run while the copies finish.
        self.check(self.cu.cuStreamSynchronize(stream), "cuStreamSynchronize")


_driver: _Driver | None = None
_driver_lock = threading.Lock()


def driver() -> _Driver:
    global _driver
    with _driver_lock:
        if _driver is None:
            _driver = _Driver()
        return _driver


def visible_device_count() -> int:
    """CUDA devices this process sees; 0 where there is no driver (CPU nodes, CI)."""
    try:
        return driver().device_count()
    except (OSError, CudaError):
        return 0


def format_uuid(raw: bytes) -> str:
    """16 UUID bytes in nvidia-smi's form: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx."""
    h = raw.hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _norm_uuid(u: str) -> str:
    u = u.strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def device_uuids() -> list[str]:
    d = driver()
    return [d.uuid(i) for i in range(d.device_count())]


def device_index_for_uuid(uuid: str) -> int:
    """The CUDA ordinal, in this process (CUDA_VISIBLE_DEVICES applies), of the GPU with this UUID."""
    want = _norm_uuid(uuid)
    uuids = device_uuids()
    for i, u in enumerate(uuids):
        if _norm_uuid(u) == want:
            return i
    raise LookupError(f"GPU {uuid} is not visible to this process (visible: {', '.join(uuids) or 'none'}); "
                      "the sidecar must see the engine's GPUs (CUDA_VISIBLE_DEVICES, device plugin)")


# ---------------------------------------------------------------------------------------- regions


class CudaRegion:
    """Engine memory mapped into this process with CUDA IPC; valid until close().

    Each region holds its own mapping: no registry of open handles. The driver reference-counts repeated opens of
    one handle in a process (REFCOUNT_NOTE), so two regions of the same handle have the same address and closing
    one leaves the other valid.
    """

    mem_type = "VRAM"

    def __init__(self, device_id: int, addr: int, nbytes: int) -> None:
        self.device_id = device_id
        self.addr = addr
        self.nbytes = nbytes
        self._lock = threading.Lock()
        self._open = True

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
        d = driver()
        with d.on(self.device_id):
            d.ipc_close(self.addr)

    def __repr__(self) -> str:
        return f"CudaRegion(dev={self.device_id}, addr=0x{self.addr:x}, nbytes={self.nbytes})"


def import_cuda_ipc(h: Any) -> CudaRegion:
    """Map a CudaIpcHandle (sidecar.contract.messages) on the GPU its UUID names. Checks it covers h.nbytes."""
    if len(h.handle) != IPC_HANDLE_BYTES:
        raise ValueError(f"CUDA IPC handle of {len(h.handle)} bytes, expected {IPC_HANDLE_BYTES}")
    if h.nbytes < 0:
        raise ValueError("negative handle size")
    dev = device_index_for_uuid(h.device_uuid)
    d = driver()
    with d.on(dev):
        base = d.ipc_open(bytes(h.handle))
        try:
            _, size = d.address_range(base)
            if size < h.nbytes:
                raise ValueError(f"handle declares {h.nbytes} bytes but its allocation has only {size}")
        except BaseException:
            d.ipc_close(base)
            raise
    return CudaRegion(dev, base, h.nbytes)


class CudaBuffer:
    """Sidecar-owned device memory (a staging slot): a plain cuMemAlloc allocation, whatever the
    torch allocator settings are, so NIXL/UCX see memory this process owns (fast cuda_ipc path)."""

    mem_type = "VRAM"

    def __init__(self, device_id: int, nbytes: int) -> None:
        self.device_id = device_id
        self.nbytes = nbytes
        d = driver()
        if nbytes > 0:
            with d.on(device_id):
                self.addr = d.mem_alloc(nbytes)
        else:
            self.addr = 0
        self._live = nbytes > 0

    def close(self) -> None:
        if not self._live:
            return
        self._live = False
        d = driver()
        with d.on(self.device_id):
            d.mem_free(self.addr)

    def __repr__(self) -> str:
        return f"CudaBuffer(dev={self.device_id}, addr=0x{self.addr:x}, nbytes={self.nbytes})"


# ---------------------------------------------------------------------------------------- copies


class CudaOps:
    """Copies and checksums on one GPU (MemoryOps for mem_type VRAM)."""

    mem_type = "VRAM"

    def __init__(self, device_id: int, warm: bool = True) -> None:
        self.device_id = device_id
        self._local = threading.local()  # one copy stream per calling thread: concurrent fills overlap
        self._warm = start_warm_up(device_id) if warm else None

    def alloc(self, nbytes: int) -> CudaBuffer:
        return CudaBuffer(self.device_id, nbytes)

    def _stream(self) -> Any:
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = driver().stream_create()
        return s

    def copy_many(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """(dst_addr, src_addr, nbytes) triples, issued on this thread's non-blocking stream; returns when done."""
        d = driver()
        with d.on(self.device_id):
            s = self._stream()
            for dst, src, n in copies:
                if n > 0:
                    d.memcpy_async(dst, src, n, s)
            d.stream_sync(s)

    def checksum(self, addr: int, nbytes: int) -> str:
        """One range: the batched kernel too (one launch instead of ~10 torch ops and a sync per chunk)."""
        if self._warm is not None:
            self._warm.join()
        return device_checksums([(addr, nbytes)], self.device_id)[0]

    def checksum_many(self, items: Sequence[tuple[int, int]]) -> list[str]:
        """checksum() of each (addr, nbytes), in one batched launch instead of one per range."""
        if self._warm is not None:
            self._warm.join()
        return device_checksums(items, self.device_id)
