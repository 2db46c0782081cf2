"""Turn the tensors an engine holds into a Manifest another process can map.

One manifest entry per distinct storage (dedupe by storage: tied weights and views are moved once),
plus one entry per zero-byte tensor. CPU storages move into POSIX shared memory *in place*
(`_share_filename_cpu_` swaps the storage's data pointer, so every view follows); CUDA storages are
exported as CUDA IPC handles, one per allocation segment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from sidecar.contract.messages import (
    MAX_IDENTITY_FIELDS,
    Handle,
    Manifest,
    ShmHandle,
    TensorEntry,
    fingerprint,
    layout_digest,
)

SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class ModelIdentity:
    """Everything that changes the bytes or their layout; part of the fingerprint."""

    model_id: str
    revision: str
    dtype: str
    tp_rank: int
    tp_size: int
    quantization: str = "none"
    extra: tuple[tuple[str, str], ...] = ()

    def fields(self) -> dict[str, str | int]:
        d: dict[str, str | int] = {
            "model_id": self.model_id,
            "revision": self.revision,
            "dtype": self.dtype,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "quantization": self.quantization,
        }
        for k, v in self.extra:
            d[f"extra.{k}"] = v
        return d


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _storage_entries(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[TensorEntry]]:
    """Group tensors by storage. Returns {entry name: uint8 view of the whole storage} and zero-byte entries."""
    by_storage: dict[tuple[str, int], list[tuple[str, torch.Tensor]]] = {}
    zero: list[TensorEntry] = []
    for name in sorted(tensors):
        t = tensors[name]
        st = t.untyped_storage()
        if st.nbytes() == 0 or t.numel() == 0:
            zero.append(TensorEntry(name, dtype_name(t.dtype), list(t.shape), -1, 0, 0))
            continue
        by_storage.setdefault((str(t.device), st.data_ptr()), []).append((name, t))
    whole: dict[str, torch.Tensor] = {}
    for members in by_storage.values():
        name, t = members[0]  # names are sorted: the canonical name is the smallest one
        st = t.untyped_storage()
        whole[name] = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
    return whole, zero


def _entry_meta(t: torch.Tensor, storage_view: torch.Tensor) -> tuple[str, list[int]]:
    """The tensor's own dtype/shape when it covers its storage exactly, else raw bytes."""
    covers = t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == storage_view.numel()
    return (dtype_name(t.dtype), list(t.shape)) if covers else ("uint8", [storage_view.numel()])


def share_cpu_storage(view: torch.Tensor) -> ShmHandle:
    st = view.untyped_storage()
    _, filename, size = st._share_filename_cpu_()  # type: ignore[attr-defined]
    name = filename.decode()
    path = SHM_DIR + name
    # torch's refcounted shm file holds a small header before the data; the data are the last `size` bytes.
    offset = os.stat(path).st_size - size
    if offset < 0 or size != st.nbytes():
        raise RuntimeError(f"unexpected torch shm layout for {path}: file vs storage size")
    return ShmHandle(name=name.lstrip("/"), offset=offset, nbytes=size)


def compute_fingerprint(identity: ModelIdentity, tensors: dict[str, torch.Tensor]) -> str:
    """Computed once, on the tensors as built before any load, so source and target agree on it."""
    kinds = {t.device.type for t in tensors.values()}
    return layout_fingerprint(identity, kinds, [(n, dtype_name(t.dtype), list(t.shape)) for n, t in tensors.items()])


def layout_fingerprint(identity: ModelIdentity, device_types: set[str],
                       layout: list[tuple[str, str, list[int]]]) -> str:
    """The fingerprint `compute_fingerprint` gives tensors of this layout on these device types, without tensors
    (a file-level target computes it from a source's record before it allocates anything)."""
    fields = {**identity.fields(), "device_types": ",".join(sorted(device_types))}
    return fingerprint(fields, layout)


def describe_fingerprint(identity: ModelIdentity, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """What `compute_fingerprint` hashes, readable: every identity field as text, the device types, and a digest of
    the pre-load layout. Records carry it, so `mx-sidecar status --explain` can name the fields two replicas
    differ in (the fingerprint alone says only that they differ)."""
    import hashlib

    def short(text: str) -> str:  # bounded for the schema (MAX_NAME_CHARS), still telling
        return text if len(text) <= 240 else f"{text[:160]}... sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    layout = sorted((n, dtype_name(t.dtype), list(t.shape)) for n, t in tensors.items())
    fields = {short(k): short(str(v)) for k, v in identity.fields().items() if k != "tp_rank"}
    fields["device_types"] = ",".join(sorted({t.device.type for t in tensors.values()}))
    fields["layout"] = f"{len(layout)} tensors, " + hashlib.sha256(repr(layout).encode()).hexdigest()[:16]
    return dict(list(fields.items())[:MAX_IDENTITY_FIELDS])


def share_cpu_storages(tensors: dict[str, torch.Tensor]) -> int:
    """Move every distinct non-empty CPU storage into shared memory in place. Returns how many moved."""
    moved = 0
    seen: set[int] = set()
    for t in tensors.values():
        st = t.untyped_storage()
        if t.device.type != "cpu" or st.nbytes() == 0 or st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        if not st.is_shared():
            st._share_filename_cpu_()  # type: ignore[attr-defined]
            moved += 1
    return moved


def build_manifest(identity: ModelIdentity, fp: str, tensors: dict[str, torch.Tensor], expose: bool,
                   described: dict[str, str] | None = None) -> Manifest:
    """Manifest of `tensors`. With expose=True, CPU storages move to shm and GPU ones get IPC handles.
    `described`: describe_fingerprint's fields, carried for explanations."""
    devices = {t.device.type for t in tensors.values() if t.numel() > 0}
    if len(devices) > 1:
        raise RuntimeError(f"a rank's tensors span several device types: {sorted(devices)}")
    kind: Literal["shm", "cuda_ipc"] = "cuda_ipc" if devices == {"cuda"} else "shm"
    if not expose:
        return Manifest(identity.model_id, identity.revision, fp, identity.tp_rank, identity.tp_size, kind, False,
                        identity=dict(described or {}))

    whole, zero = _storage_entries(tensors)
    handles: list[Handle] = []
    entries: list[TensorEntry] = list(zero)
    if kind == "shm":
        for name, view in whole.items():
            handles.append(share_cpu_storage(view))
            dtype, shape = _entry_meta(tensors[name], view)
            entries.append(TensorEntry(name, dtype, shape, len(handles) - 1, 0, view.numel()))
    else:
        from runtime_hooks.cuda_ipc import export_cuda_tensors

        cuda_handles, where = export_cuda_tensors(whole)
        handles.extend(cuda_handles)
        for name, view in whole.items():
            h, off = where[name]
            dtype, shape = _entry_meta(tensors[name], view)
            entries.append(TensorEntry(name, dtype, shape, h, off, view.numel()))
    entries.sort(key=lambda e: e.name)
    return Manifest(
        identity.model_id, identity.revision, fp, identity.tp_rank, identity.tp_size, kind, True,
        layout_digest(entries), handles, entries, identity=dict(described or {}),
    )

