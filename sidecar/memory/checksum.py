"""Device checksums (mxs1) and the torch side of the GPU work: wrapping raw device pointers, warm-up, the batched
Triton kernel (sidecar.memory.checksum_kernel) and the CPU reference.

Imports torch, numpy and the CUDA driver (sidecar.memory.cuda) only inside the functions that need them: the module
imports on a machine without a GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

CHECKSUM_ALGO = "mxs1"
_P31 = (1 << 31) - 1  # Mersenne prime for the position-weighted sum
_CHUNK_WORDS = 1 << 24  # 64 MiB of data per on-device step: ~256 MiB of int64 scratch


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
    from sidecar.memory.cuda import visible_device_count

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
    from sidecar.memory.cuda import driver

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
    """Wait for torch's current stream through the driver, which releases the GIL while waiting."""
    import torch

    from sidecar.memory.cuda import driver

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
