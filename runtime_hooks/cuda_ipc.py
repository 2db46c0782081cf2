"""Export an engine's CUDA tensors as legacy CUDA IPC handles, one per cudaMalloc allocation segment.

Runs in the engine process. The PyTorch caching allocator packs many tensors into one cudaMalloc
segment, so tensors are grouped by the allocation that holds them (cuMemGetAddressRange) and each
segment is exported once (cuIpcGetMemHandle on its base): registration and import cost scale with
segments, not tensors. The handle is the raw 64-byte CUipcMemHandle, no pickle, no torch IPC
reference-counting files (torch's `_share_cuda_` would also swap each storage's deleter).

Memory that legacy IPC cannot export is refused with an error that says why: CUDA VMM allocations
(PyTorch `expandable_segments:True`, vLLM's cumem/sleep-mode pools) and stream-ordered pools
(`backend:cudaMallocAsync`).
"""

from __future__ import annotations

import os

import torch

from sidecar.contract.messages import CudaIpcHandle
from sidecar.memory.cuda import (
    CU_MEMORYTYPE_DEVICE,
    CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
    CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
    driver,
)


class UnsupportedCudaMemory(RuntimeError):
    """The tensor's memory cannot be exported with cudaIpcGetMemHandle."""


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from t.data_ptr() to the end of its last element (views with gaps included)."""
    if t.numel() == 0:
        return 0
    if any(s < 0 for s in t.stride()):
        raise ValueError("tensors with negative strides cannot be exported")
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()


def _alloc_conf() -> str:
    vals = [f"{k}={os.environ[k]!r}" for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF") if k in os.environ]
    return ", ".join(vals) or "no PYTORCH_CUDA_ALLOC_CONF/PYTORCH_ALLOC_CONF set"


def export_cuda_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[list[CudaIpcHandle], dict[str, tuple[int, int]]]:
    """One CudaIpcHandle per allocation segment holding any of `tensors`, and for each tensor name its
    (handle index, byte offset of t.data_ptr() from the segment base). Zero-byte tensors map to (-1, 0).

    A handle's nbytes is the extent, from the segment base, that its tensors cover (never more than
    the segment): the sidecar maps the segment but registers and touches only that part.
    """
    d = driver()
    seg_of: dict[tuple[int, int], int] = {}  # (device, segment base) -> handle index
    segs: list[tuple[int, int, int, bytes]] = []  # device, base, size, raw handle
    extent: list[int] = []
    uuids: dict[int, str] = {}
    where: dict[str, tuple[int, int]] = {}
    for name, t in tensors.items():
        span = _span_bytes(t)
        if span == 0:
            where[name] = (-1, 0)
            continue
        if t.device.type != "cuda":
            raise ValueError(f"tensor {name!r} is on {t.device}, not on a CUDA device")
        dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
        ptr = t.data_ptr()
        with d.on(dev):
            if d.pointer_attr(ptr, CU_POINTER_ATTRIBUTE_MEMORY_TYPE) != CU_MEMORYTYPE_DEVICE:
                raise UnsupportedCudaMemory(f"tensor {name!r} is not in device memory (managed or host memory)")
            if not d.pointer_attr(ptr, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE):
                raise UnsupportedCudaMemory(
                    f"tensor {name!r} on cuda:{dev} lives in memory that legacy CUDA IPC (cudaIpcGetMemHandle) "
                    "cannot export: CUDA virtual memory (VMM), as PyTorch allocates with "
                    "expandable_segments:True (also vLLM sleep mode / cumem pools), or a cudaMallocAsync pool. "
                    f"This engine has {_alloc_conf()}. mx-sidecar does not support such memory yet: start the "
                    "engine without expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False) and "
                    "with the default (native) allocator backend."
                )
            base, size = d.address_range(ptr)
            idx = seg_of.get((dev, base))
            if idx is None:
                idx = seg_of[(dev, base)] = len(segs)
                segs.append((dev, base, size, d.ipc_get(base)))
                extent.append(0)
        off = ptr - base
        if off + span > size:
            raise ValueError(f"tensor {name!r} [{off}, {off + span}) runs past its allocation of {size} bytes")
        extent[idx] = max(extent[idx], off + span)
        where[name] = (idx, off)
    handles = []
    for (dev, _base, _size, raw), n in zip(segs, extent, strict=True):
        if dev not in uuids:
            uuids[dev] = d.uuid(dev)
        handles.append(CudaIpcHandle(device_uuid=uuids[dev], handle=raw, nbytes=n))
    return handles, where
