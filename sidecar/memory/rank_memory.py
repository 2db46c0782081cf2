"""One engine rank's memory as seen by the sidecar: imported regions, addresses, checksums."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from sidecar.contract.messages import Handle, Manifest
from sidecar.memory.regions import MemoryOps, Region, import_handle, ops_for
from sidecar.planner import target_addresses
from sidecar.source.ring import StagingRing
from sidecar.transport import Registration, Transport


@dataclass
class RankMemory:
    rank: int
    manifest: Manifest
    regions: list[Region]
    ops: MemoryOps
    entry_addrs: list[int]
    transport: Transport | None = None
    ring: StagingRing | None = None
    checksums: list[str] = field(default_factory=list)
    import_s: float = 0.0
    register_s: float = 0.0
    registrations: list[Registration] = field(default_factory=list)
    engine_reg: Registration | None = None

    def register(self, transport: Transport) -> None:
        self.transport = transport
        reg = transport.register(self.regions)
        self.registrations.append(reg)
        self.engine_reg = reg
        self.register_s = reg.seconds

    def unregister_engine(self) -> None:
        """A staged source serves from its ring only: engine memory leaves NIXL (and the published metadata, whose
        holder could otherwise WRITE it: docs/SECURITY-NIXL.md)."""
        reg = self.engine_reg
        if reg is None or self.transport is None:
            return
        self.transport.deregister(reg)
        self.registrations.remove(reg)
        self.engine_reg = None

    def add_ring(self, ring: StagingRing) -> Registration:
        assert self.transport is not None
        self.ring = ring
        reg = self.transport.register(ring.slots)
        self.registrations.append(reg)
        return reg

    def drop_ring(self, reg: Registration) -> None:
        assert self.transport is not None and self.ring is not None
        self.transport.deregister(reg)
        self.registrations.remove(reg)
        self.ring.close()
        self.ring = None

    @property
    def mem_type(self) -> str:
        return self.ops.mem_type

    @property
    def device_id(self) -> int:
        return self.ops.device_id

    @classmethod
    def import_manifest(cls, manifest: Manifest, mapped: dict[Handle, Region] | None = None) -> RankMemory:
        """Map every handle of `manifest`, taking (and removing) from `mapped` those mapped ahead (prefetch)."""
        t0 = time.monotonic()
        regions: list[Region] = []
        try:
            for h in manifest.handles:
                ahead = mapped.pop(h, None) if mapped is not None else None
                regions.append(ahead if ahead is not None else import_handle(h))
        except BaseException:
            for r in regions:
                r.close()
            raise
        devices = {(r.mem_type, r.device_id) for r in regions}
        if len(devices) > 1:
            for r in regions:
                r.close()
            raise ValueError(f"rank {manifest.tp_rank} spans several devices: {sorted(devices)}")
        from sidecar.memory.regions import CpuOps

        ops: MemoryOps = ops_for(regions[0]) if regions else CpuOps()
        addrs = target_addresses(manifest, [r.addr for r in regions])
        return cls(manifest.tp_rank, manifest, regions, ops, addrs, import_s=time.monotonic() - t0)

    async def compute_checksums(self) -> list[str]:
        entries = self.manifest.tensors

        def run() -> list[str]:  # one batched launch on a GPU
            return self.ops.checksum_many([(a, e.nbytes) for a, e in zip(self.entry_addrs, entries, strict=True)])

        return await asyncio.to_thread(run)

    def close(self) -> None:
        """Deregister from NIXL first, then unmap: registered-but-unmapped memory leaked on every fallback."""
        if self.transport is not None:
            for reg in self.registrations:
                self.transport.deregister(reg)
        self.registrations.clear()
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        for r in self.regions:
            r.close()
