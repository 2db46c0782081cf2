"""Source manifest x target manifest -> chunked, bounds-checked copy plan.

The logical byte stream of a rank is its entries in name order. It is cut into chunks of at most
`chunk_bytes` (the staging slot size); entries larger than a chunk are split, small ones are packed.
Source and target compute the same plan from equal layouts, so a chunk number is all they exchange.

Safety: every target range comes from the target's *own* manifest (validated against its own handle
sizes) and every length must equal the source's; a plan that would step outside is rejected before
a byte moves, whatever Redis or a peer said.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sidecar.contract.messages import (
    MAX_CHUNKS_PER_RANK,
    Manifest,
    TensorEntry,
    layout_digest,
    validate_manifest,
)
from sidecar.errors import PlanError

SLOT_ALIGN = 256  # piece starts inside a slot: keeps GPU copies and RDMA on aligned addresses



@dataclass(frozen=True)
class Piece:
    entry: int  # index into the manifest's entries (sorted by name on both sides)
    entry_offset: int
    nbytes: int
    slot_offset: int


@dataclass(frozen=True)
class Chunk:
    index: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def _align(n: int) -> int:
    return (n + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN


def chunk_plan(entries: list[TensorEntry], chunk_bytes: int, max_chunks: int = MAX_CHUNKS_PER_RANK) -> list[Chunk]:
    if chunk_bytes < SLOT_ALIGN:
        raise PlanError(f"chunk size {chunk_bytes} below {SLOT_ALIGN}")
    total = sum(max(e.nbytes, 0) for e in entries)
    if -(-total // chunk_bytes) > max_chunks:  # refused before building anything
        raise PlanError(f"{total} bytes in chunks of {chunk_bytes} exceed {max_chunks} chunks per rank "
                        "(raise MX_STAGING_SLOT_BYTES)")
    chunks: list[Chunk] = []
    pieces: list[Piece] = []
    used = 0
    for i, e in enumerate(entries):
        off = 0
        while off < e.nbytes:
            start = _align(used)
            room = chunk_bytes - start
            if room <= 0:
                if len(chunks) + 1 >= max_chunks:  # alignment padding can add a few chunks past the estimate
                    raise PlanError(f"plan exceeds {max_chunks} chunks per rank (raise MX_STAGING_SLOT_BYTES)")
                chunks.append(Chunk(len(chunks), tuple(pieces)))
                pieces, used, start, room = [], 0, 0, chunk_bytes
            n = min(room, e.nbytes - off)
            pieces.append(Piece(i, off, n, start))
            used = start + n
            off += n
    if pieces:
        chunks.append(Chunk(len(chunks), tuple(pieces)))
    return chunks


@dataclass(frozen=True)
class Plan:
    """Every READ of one rank, computed and bounds-checked before the first is posted.

    Chunk k's descriptors are rows `starts[k]:starts[k+1]` of `local` and `remote` (NIXL Nx3 addr, len, dev).
    Staged plans hold slot offsets in `remote` (slot base 0): the source names the slot of each chunk at run
    time, and a slot offset plus length was checked to fit the slot.
    """

    chunks: tuple[Chunk, ...]
    local: np.ndarray
    remote: np.ndarray
    starts: tuple[int, ...]
    staged: bool

    def descriptors(self, k: int, slot_addr: int = 0) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.starts[k], self.starts[k + 1]
        remote = self.remote[a:b]
        if self.staged:
            remote = remote.copy()
            remote[:, 0] += np.uint64(slot_addr)
        return self.local[a:b], remote


def make_plan(
    entries: list[TensorEntry],
    local_addrs: list[int],
    local_dev: int,
    remote_addrs: list[int] | None,
    remote_dev: int,
    chunk_bytes: int,
    max_chunks: int = MAX_CHUNKS_PER_RANK,
) -> Plan:
    """The whole plan: chunks of at most `chunk_bytes`, and every piece's local and remote range.

    `remote_addrs` are the source's per-entry addresses (direct) or None (staged: pieces sit at slot offsets
    within one slot of `chunk_bytes`). Raises PlanError for any piece outside its entry or slot."""
    chunks = chunk_plan(entries, chunk_bytes, max_chunks)
    if len(local_addrs) != len(entries) or (remote_addrs is not None and len(remote_addrs) != len(entries)):
        raise PlanError("one address per entry expected")
    local: list[tuple[int, int, int]] = []
    remote: list[tuple[int, int, int]] = []
    starts = [0]
    for c in chunks:
        for p in c.pieces:
            if p.nbytes <= 0 or p.entry_offset < 0 or p.entry_offset + p.nbytes > entries[p.entry].nbytes:
                raise PlanError(f"chunk {c.index} steps outside entry {entries[p.entry].name!r}")
            if p.slot_offset < 0 or p.slot_offset + p.nbytes > chunk_bytes:
                raise PlanError(f"chunk {c.index} steps outside its slot")
            local.append((local_addrs[p.entry] + p.entry_offset, p.nbytes, local_dev))
            base = p.slot_offset if remote_addrs is None else remote_addrs[p.entry] + p.entry_offset
            remote.append((base, p.nbytes, remote_dev))
        starts.append(len(local))
    return Plan(tuple(chunks), np.array(local, dtype=np.uint64).reshape(-1, 3),
                np.array(remote, dtype=np.uint64).reshape(-1, 3), tuple(starts), remote_addrs is None)


def check_compatible(source: Manifest, target: Manifest) -> None:
    """Refuse a copy unless both sides describe the same logical tensors, rank for rank."""
    validate_manifest(target)
    if not target.exposed:
        raise PlanError("target tensors are not exposed yet")
    if source.fingerprint != target.fingerprint:
        raise PlanError("fingerprints differ: these replicas are not the same model build")
    if (source.tp_rank, source.tp_size) != (target.tp_rank, target.tp_size):
        raise PlanError(f"rank {source.tp_rank}/{source.tp_size} cannot feed rank {target.tp_rank}/{target.tp_size}")
    if source.layout_digest != target.layout_digest:
        raise PlanError("final layouts differ (post-processing diverged?): refusing to copy")
    check_entries_match(source.tensors, target)


def check_entries_match(source_entries: list[TensorEntry], target: Manifest) -> None:
    # Recomputed rather than trusting the digests: a mismatched length must never reach a descriptor.
    if layout_digest(source_entries) != target.layout_digest:
        raise PlanError("source entries do not match the target layout")
    if len(source_entries) != len(target.tensors):
        raise PlanError("entry counts differ")
    for s, t in zip(source_entries, target.tensors, strict=True):
        if (s.name, s.nbytes, s.dtype, s.shape) != (t.name, t.nbytes, t.dtype, t.shape):
            raise PlanError(f"entry {t.name!r} differs between source and target")


def target_addresses(target: Manifest, region_addrs: list[int]) -> list[int]:
    """Absolute address of each target entry in this process (0 for zero-byte entries)."""
    if len(region_addrs) != len(target.handles):
        raise PlanError("one mapped region per handle expected")
    return [region_addrs[e.handle] + e.offset if e.nbytes else 0 for e in target.tensors]

