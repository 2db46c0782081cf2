"""GPU memory for the sidecar: import engine CUDA IPC handles, own staging buffers, copy, checksum.

Everything goes through the CUDA *driver* API (libcuda.so.1, via ctypes), which is present wherever a
GPU works: no extra dependency in the engine process (runtime_hooks.cuda_ipc uses the same helpers)
and no pickle. ctypes releases the GIL during each foreign call, so waiting on a stream does not stall
other Python threads. torch is used only for the on-device checksum. Nothing here touches CUDA at import
time: the module imports on a machine without a GPU.

Facts relied on (CUDA driver API, stable ABI):
- cuIpcGetMemHandle / cuIpcOpenMemHandle_v2 work on whole cudaMalloc allocations ("segments"); the
  64-byte CUipcMemHandle is the same as the runtime's cudaIpcMemHandle_t. Opening maps the *whole*
  segment; a process may open one handle only once, so opens are reference-counted here.
- cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE) is 0 for CUDA VMM memory
  (PyTorch expandable_segments, cudaMallocAsync pools), which legacy IPC cannot export.
- cuMemGetAddressRange_v2 gives the base and size of the allocation that holds a pointer.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

CHECKSUM_ALGO = "mxs1"
_P31 = (1 << 31) - 1  # Mersenne prime for the position-weighted sum
_CHUNK_WORDS = 1 << 24  # 64 MiB of data per on-device step: ~256 MiB of int64 scratch

CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1
CU_STREAM_NON_BLOCKING = 0x1
CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2
CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10
CU_MEMORYTYPE_DEVICE = 2
IPC_HANDLE_BYTES = 64


class CudaError(RuntimeError):
    pass


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


_u64 = ctypes.c_uint64  # CUdeviceptr
_vp = ctypes.c_void_p


class _Driver:
    """The few libcuda entry points the sidecar and the hook need, typed once."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaError(f"cannot load the CUDA driver (libcuda.so.1): {e}") from None
        self.lib = lib
        sigs: dict[str, list[Any]] = {
            "cuInit": [ctypes.c_uint],
            "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
            "cuDeviceGetCount": [ctypes.POINTER(ctypes.c_int)],
            "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
            "cuDeviceGetUuid_v2": [ctypes.POINTER(_Uuid), ctypes.c_int],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(_vp), ctypes.c_int],
            "cuCtxPushCurrent_v2": [_vp],
            "cuCtxPopCurrent_v2": [ctypes.POINTER(_vp)],
            "cuPointerGetAttribute": [_vp, ctypes.c_int, _u64],
            "cuMemGetAddressRange_v2": [ctypes.POINTER(_u64), ctypes.POINTER(ctypes.c_size_t), _u64],
            "cuIpcGetMemHandle": [ctypes.POINTER(_IpcHandle), _u64],
            "cuIpcOpenMemHandle_v2": [ctypes.POINTER(_u64), _IpcHandle, ctypes.c_uint],
            "cuIpcCloseMemHandle": [_u64],
            "cuMemAlloc_v2": [ctypes.POINTER(_u64), ctypes.c_size_t],
            "cuMemFree_v2": [_u64],
            "cuStreamCreate": [ctypes.POINTER(_vp), ctypes.c_uint],
            "cuStreamSynchronize": [_vp],
            "cuMemcpyAsync": [_u64, _u64, ctypes.c_size_t, _vp],
            "cuMemcpyDtoH_v2": [_vp, _u64, ctypes.c_size_t],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int
        self.check(lib.cuInit(0), "cuInit")
        self._ctx: dict[int, int] = {}
        self._lock = threading.Lock()

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else "unknown error"
            raise CudaError(f"{what} failed: CUDA error {rc} ({text})")

    def device_count(self) -> int:
        n = ctypes.c_int()
        self.check(self.lib.cuDeviceGetCount(ctypes.byref(n)), "cuDeviceGetCount")
        return n.value

    def uuid(self, ordinal: int) -> str:
        dev = ctypes.c_int()
        self.check(self.lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        u = _Uuid()
        self.check(self.lib.cuDeviceGetUuid_v2(ctypes.byref(u), dev), "cuDeviceGetUuid_v2")
        return format_uuid(bytes(u.bytes))

    def primary_ctx(self, ordinal: int) -> int:
        with self._lock:
            ctx = self._ctx.get(ordinal)
            if ctx is None:
                dev = ctypes.c_int()
                self.check(self.lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
                c = _vp()
                # The same context the CUDA runtime (and so torch) uses on that device; kept for the process.
                self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(c), dev), "cuDevicePrimaryCtxRetain")
                ctx = self._ctx[ordinal] = int(c.value or 0)
            return ctx

    @contextmanager
    def on(self, ordinal: int) -> Iterator[None]:
        """Make the device's primary context current on this thread for the block, then restore."""
        self.check(self.lib.cuCtxPushCurrent_v2(_vp(self.primary_ctx(ordinal))), "cuCtxPushCurrent")
        try:
            yield
        finally:
            old = _vp()
            self.lib.cuCtxPopCurrent_v2(ctypes.byref(old))

    def pointer_attr(self, ptr: int, attr: int) -> int:
        out = ctypes.c_uint64(0)
        self.check(self.lib.cuPointerGetAttribute(ctypes.byref(out), attr, ptr), f"cuPointerGetAttribute({attr})")
        return out.value

    def address_range(self, ptr: int) -> tuple[int, int]:
        base, size = _u64(), ctypes.c_size_t()
        self.check(self.lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr),
                   "cuMemGetAddressRange")
        return int(base.value), int(size.value)

    def ipc_get(self, base: int) -> bytes:
        h = _IpcHandle()
        self.check(self.lib.cuIpcGetMemHandle(ctypes.byref(h), base), "cuIpcGetMemHandle")
        return ctypes.string_at(ctypes.addressof(h), IPC_HANDLE_BYTES)

    def ipc_open(self, handle: bytes) -> int:
        h = _IpcHandle()
        ctypes.memmove(ctypes.addressof(h), handle, IPC_HANDLE_BYTES)
        p = _u64()
        self.check(self.lib.cuIpcOpenMemHandle_v2(ctypes.byref(p), h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                   "cuIpcOpenMemHandle")
        return int(p.value)

    def ipc_close(self, ptr: int) -> None:
        self.check(self.lib.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")

    def mem_alloc(self, nbytes: int) -> int:
        p = _u64()
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(p), nbytes), f"cuMemAlloc({nbytes})")
        return int(p.value)

    def mem_free(self, ptr: int) -> None:
        self.check(self.lib.cuMemFree_v2(ptr), "cuMemFree")

    def stream_create(self) -> int:
        s = _vp()
        self.check(self.lib.cuStreamCreate(ctypes.byref(s), CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        return int(s.value or 0)

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.check(self.lib.cuMemcpyAsync(dst, src, nbytes, _vp(stream)), "cuMemcpyAsync")

    def read(self, src: int, nbytes: int) -> bytes:
        """A few bytes of device memory, synchronously (the context of `src`'s device must be current)."""
        buf = ctypes.create_string_buffer(nbytes)
        self.check(self.lib.cuMemcpyDtoH_v2(buf, src, nbytes), "cuMemcpyDtoH")
        return buf.raw

    def stream_sync(self, stream: int) -> None:
        # ctypes drops the GIL for the call: other threads (the event loop) run while the copies finish.
        self.check(self.lib.cuStreamSynchronize(_vp(stream)), "cuStreamSynchronize")


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

_open_lock = threading.Lock()
_opened: dict[tuple[int, bytes], list[int]] = {}  # (device, handle) -> [base address, references]


class CudaRegion:
    """Engine memory mapped into this process with CUDA IPC; valid until close()."""

    mem_type = "VRAM"

    def __init__(self, device_id: int, handle: bytes, addr: int, nbytes: int) -> None:
        self.device_id = device_id
        self.addr = addr
        self.nbytes = nbytes
        self._key: tuple[int, bytes] | None = (device_id, handle)

    def close(self) -> None:
        with _open_lock:
            key, self._key = self._key, None
            if key is None:
                return
            entry = _opened[key]
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _opened[key]
        d = driver()
        with d.on(key[0]):
            d.ipc_close(entry[0])

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
    key = (dev, bytes(h.handle))
    with _open_lock:
        entry = _opened.get(key)
        if entry is None:
            with d.on(dev):
                base = d.ipc_open(key[1])
                try:
                    _, size = d.address_range(base)
                except CudaError:
                    d.ipc_close(base)
                    raise
            if size < h.nbytes:
                with d.on(dev):
                    d.ipc_close(base)
                raise ValueError(f"handle declares {h.nbytes} bytes but its allocation has only {size}")
            entry = _opened[key] = [base, 0]
        entry[1] += 1
    return CudaRegion(dev, key[1], entry[0], h.nbytes)


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


# ---------------------------------------------------------------------------------------- operations


class _RawCuda:
    """Minimal __cuda_array_interface__ so torch can wrap a raw device pointer without a copy."""

    def __init__(self, addr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (addr, False),
                                         "version": 2, "strides": None}


def wrap_bytes(addr: int, nbytes: int, device_id: int) -> Any:
    """A torch uint8 tensor over [addr, addr+nbytes) on device_id (no copy; the caller keeps the memory alive)."""
    import torch

    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=f"cuda:{device_id}")
    t = torch.as_tensor(_RawCuda(addr, nbytes))
    if t.device.index != device_id:
        raise ValueError(f"address 0x{addr:x} lies on cuda:{t.device.index}, not cuda:{device_id}")
    return t


_warm_lock = threading.Lock()
_warm: dict[int, threading.Thread] = {}


def warm_up(device_id: int) -> None:
    """Import torch, initialise it on the device and load the checksum kernels.

    The first checksum in a fresh sidecar otherwise pays for all of that (3.5-4 s for 77 tensors on an H100,
    against 0.13 s for 200 tensors once warm), on the critical path of a target's verification.
    """
    try:
        import torch

        with torch.cuda.device(device_id):
            buf = torch.zeros(4096, dtype=torch.uint8, device=f"cuda:{device_id}")
            device_checksum(buf.data_ptr(), 1023, device_id)  # aligned words + tail
            device_checksum(buf.data_ptr() + 1, 1023, device_id)  # the misaligned path (clone)
            device_checksums([(buf.data_ptr(), 1023), (buf.data_ptr() + 1024, 8)], device_id)  # compiles the kernel
    except Exception as e:  # a sidecar without a usable torch fails later, where the error has context
        import logging

        logging.getLogger("mx.cuda").debug("warm-up of cuda:%d failed: %s", device_id, e)


def start_warm_up(device_id: int) -> threading.Thread:
    """warm_up() once per device, in a background thread (overlaps NIXL agent creation and registration)."""
    with _warm_lock:
        t = _warm.get(device_id)
        if t is None:
            t = _warm[device_id] = threading.Thread(target=warm_up, args=(device_id,), daemon=True,
                                                    name=f"mx-cuda-warm-up-{device_id}")
            t.start()
        return t


def _import_torch_and_warm_up() -> None:
    try:
        import torch  # noqa: F401
    except Exception as e:
        import logging

        logging.getLogger("mx.cuda").debug("background import of torch failed: %s", e)
        return
    for dev in range(visible_device_count()):
        start_warm_up(dev)


def preload_torch() -> threading.Thread:
    """Start importing torch in the background, once per process, then warm up every visible GPU (warm_up: CUDA
    context, checksum kernels). Call it when the daemon starts on a GPU node: all of it then overlaps the wait for
    the engine. Measured: `import torch` 2.4-4.9 s on the GPU machines; the CUDA part and the checksum kernel's first
    compile took 1.5-1.7 s on one H200, on a vLLM target's critical path (verify) when they started only at import."""
    with _warm_lock:
        t = _warm.get(-1)
        if t is None:
            t = _warm[-1] = threading.Thread(target=_import_torch_and_warm_up, daemon=True, name="mx-torch-import")
            t.start()
        return t


class CudaOps:
    """Copies and checksums on one GPU (MemoryOps for mem_type VRAM)."""

    mem_type = "VRAM"

    def __init__(self, device_id: int, warm: bool = True) -> None:
        self.device_id = device_id
        self._local = threading.local()  # one copy stream per calling thread: concurrent fills overlap
        self._warm = start_warm_up(device_id) if warm else None

    def alloc(self, nbytes: int) -> CudaBuffer:
        return CudaBuffer(self.device_id, nbytes)

    def _stream(self) -> int:
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = driver().stream_create()
        return int(s)

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


def _format_checksum(nbytes: int, s0: int, s1: int) -> str:
    return f"{CHECKSUM_ALGO}:{nbytes}:{s0 % (1 << 64):016x}:{s1 % _P31:08x}"


def device_checksum(addr: int, nbytes: int, device_id: int) -> str:
    """mxs1 over [addr, addr+nbytes) on the GPU; equal to reference_checksum() of the same bytes.

    Words u_i are the little-endian uint32s of the bytes (the last one zero-padded), i = 0..m-1:
      S0 = sum(u_i) mod 2^64,  S1 = sum(((i mod P) + 1) * (u_i mod P)) mod P,  P = 2^31 - 1.
    Integer arithmetic only (no overflow: every partial sum stays below 2^63), so the result does not depend on
    the reduction order: the same on any GPU and on the CPU.
    """
    if nbytes == 0:
        return _format_checksum(0, 0, 0)
    import torch

    t = wrap_bytes(addr, nbytes, device_id)
    n4 = nbytes // 4
    s0 = s1 = 0
    with torch.cuda.device(device_id), torch.no_grad():
        chunk_bytes = 4 * _CHUNK_WORDS
        for start in range(0, n4 * 4, chunk_bytes):
            part = t[start:min(start + chunk_bytes, n4 * 4)]
            if (addr + start) % 4:
                part = part.clone()  # int32 loads need 4-byte alignment
            x = part.view(torch.int32).to(torch.int64).bitwise_and_(0xFFFFFFFF)
            w0 = start // 4
            idx = torch.arange(w0, w0 + x.numel(), dtype=torch.int64, device=t.device)
            idx.remainder_(_P31).add_(1)
            total0 = x.sum()
            idx.mul_(x.remainder_(_P31)).remainder_(_P31)
            sums = torch.stack([total0, idx.sum()])
            _sync_current_stream(device_id)
            a, b = sums.tolist()
            s0 += a
            s1 += b
        if nbytes % 4:
            tail = bytes(t[n4 * 4:].tolist()) + b"\0" * (4 - nbytes % 4)
            u = int.from_bytes(tail, "little")
            s0 += u
            s1 += ((n4 % _P31) + 1) * (u % _P31)
    return _format_checksum(nbytes, s0, s1)


_BLOCK_WORDS = 1 << 14  # 64 KiB of data per Triton program
_kernel: Any = None
_kernel_lock = threading.Lock()


def _mxs1_kernel() -> Any:
    """The batched kernel (sidecar.memory.checksum_kernel), or None where Triton cannot be imported (then every range
    takes the per-range torch path)."""
    global _kernel
    with _kernel_lock:
        if _kernel is None:
            try:
                from sidecar.memory.checksum_kernel import mxs1_blocks

                _kernel = mxs1_blocks
            except Exception as e:
                import logging

                logging.getLogger("mx.cuda").warning("batched device checksums unavailable (%s); one launch per "
                                                     "tensor", e)
                _kernel = False
        return _kernel or None


def plan_blocks(ranges: Sequence[tuple[int, int]], block: int = _BLOCK_WORDS) -> tuple[Any, Any]:
    """(address, whole words) per range -> the kernel's int64 [3, blocks] table (address of the block's first
    word, words in it, index of that word within its range; an even number of blocks) and the first block of each
    range. Ranges of 0 words are not allowed (the caller leaves them out)."""
    import numpy as np

    addrs = np.array([a for a, _ in ranges], dtype=np.int64)
    words = np.array([w for _, w in ranges], dtype=np.int64)
    nblocks = (words + block - 1) // block
    owner = np.repeat(np.arange(len(ranges)), nblocks)  # range of each block
    starts = np.concatenate(([0], np.cumsum(nblocks)[:-1])).astype(np.int64)  # first block of each range
    first = (np.arange(owner.size, dtype=np.int64) - starts[owner]) * block
    table = np.stack([addrs[owner] + 4 * first, np.minimum(words[owner] - first, block), first])
    if table.shape[1] % 2:
        # An even count keeps every row of the table 16-byte aligned, so the kernel always gets the one pointer
        # specialization that warm_up() compiled (Triton specializes on 16-byte alignment): an odd count once cost
        # a second compile, 1 s, on a vLLM target's verification. The extra block has 0 words: it sums to 0 and is
        # added to the last range.
        table = np.concatenate([table, np.array([[addrs[0]], [0], [0]], dtype=np.int64)], axis=1)
    return table, starts


def combine_blocks(partial: Any, starts: Any) -> tuple[Any, Any]:
    """The kernel's int64 [2 * blocks] partial sums -> (S0 mod 2^64, S1 not yet reduced mod P) per range."""
    import numpy as np

    sums = partial.view(np.uint64).reshape(-1, 2)
    return np.add.reduceat(sums[:, 0], starts), np.add.reduceat(sums[:, 1], starts)  # uint64 wraps as S0 is defined


def device_checksums(items: Sequence[tuple[int, int]], device_id: int) -> list[str]:
    """device_checksum() of every (addr, nbytes) in `items`, with one kernel launch for all of them.

    The aligned whole words of every range are cut into blocks of _BLOCK_WORDS; one Triton program sums one block
    (both sums of mxs1, exact in int64), and the host adds the partial sums per range (numpy, mod 2^64 / mod P).
    Tails (1-3 bytes past the last whole word) are read with one small copy each; ranges that do not start on a
    4-byte boundary (rare: torch aligns storages) and machines without Triton take device_checksum().
    Measured on one H200: 1011 tensors / 10.4 GB in 17 ms (device_checksum per tensor: 215 ms), 10,000 tensors of
    16 KiB in 15 ms (1.29 s): one launch and one copy of the partial sums per call instead of ~10 launches per tensor.
    """
    n_items = len(items)
    out: list[str | None] = [None] * n_items
    kernel = _mxs1_kernel()
    batch = [i for i, (a, n) in enumerate(items) if n >= 4 and a % 4 == 0] if kernel is not None else []
    in_batch = set(batch)
    for i, (a, n) in enumerate(items):
        if i not in in_batch:
            out[i] = device_checksum(a, n, device_id)
    if not batch:
        return [o or "" for o in out]
    import torch

    meta_np, starts = plan_blocks([(items[i][0], items[i][1] // 4) for i in batch])
    dev = f"cuda:{device_id}"
    with torch.cuda.device(device_id), torch.no_grad():
        meta = torch.from_numpy(meta_np).to(dev)
        partial = torch.empty(2 * meta_np.shape[1], dtype=torch.int64, device=dev)
        kernel[(meta_np.shape[1],)](meta[0], meta[1], meta[2], partial, P=_P31, BLOCK=_BLOCK_WORDS, num_warps=8)
        _sync_current_stream(device_id)
        s0, s1 = combine_blocks(partial.cpu().numpy(), starts)
    d = driver()
    with d.on(device_id):
        for j, i in enumerate(batch):
            a, n = items[i]
            t0, t1 = int(s0[j]), int(s1[j]) % _P31
            if n % 4:
                n4 = n // 4
                u = int.from_bytes(d.read(a + 4 * n4, n % 4) + b"\0" * (4 - n % 4), "little")
                t0 += u
                t1 += ((n4 % _P31) + 1) * (u % _P31)
            out[i] = _format_checksum(n, t0, t1)
    return [o or "" for o in out]


def _sync_current_stream(device_id: int) -> None:
    """Wait for torch's current stream through the driver: ctypes releases the GIL while waiting."""
    import torch

    d = driver()
    with d.on(device_id):
        d.stream_sync(torch.cuda.current_stream(device_id).cuda_stream)


def reference_checksum(data: bytes | memoryview) -> str:
    """The mxs1 algorithm on the CPU (numpy); for tests and for DRAM cross-checks."""
    import numpy as np

    b = bytes(data)
    n = len(b)
    if n == 0:
        return _format_checksum(0, 0, 0)
    b += b"\0" * (-n % 4)
    u = np.frombuffer(b, dtype="<u4").astype(np.uint64)
    s0 = int(u.sum(dtype=np.uint64))
    s1 = 0
    for start in range(0, u.size, _CHUNK_WORDS):
        x = u[start:start + _CHUNK_WORDS]
        idx = np.arange(start, start + x.size, dtype=np.uint64) % np.uint64(_P31) + np.uint64(1)
        s1 += int(((idx * (x % np.uint64(_P31))) % np.uint64(_P31)).sum(dtype=np.uint64))
    return _format_checksum(n, s0, s1)
