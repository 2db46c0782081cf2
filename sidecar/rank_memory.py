"""One engine rank's memory as seen by the sidecar: imported regions, addresses, checksums."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from sidecar.memory import MemoryOps, Region, import_handle, ops_for
from sidecar.planner import target_addresses
from sidecar.protocol import Manifest
from sidecar.staging import StagingRing
from sidecar.transport import Transport


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

    @property
    def mem_type(self) -> str:
        return self.ops.mem_type

    @property
    def device_id(self) -> int:
        return self.ops.device_id

    @classmethod
    def import_manifest(cls, manifest: Manifest) -> RankMemory:
        t0 = time.monotonic()
        regions: list[Region] = []
        try:
            for h in manifest.handles:
                regions.append(import_handle(h))
        except BaseException:
            for r in regions:
                r.close()
            raise
        devices = {(r.mem_type, r.device_id) for r in regions}
        if len(devices) > 1:
            for r in regions:
                r.close()
            raise ValueError(f"rank {manifest.tp_rank} spans several devices: {sorted(devices)}")
        from sidecar.memory import CpuOps

        ops: MemoryOps = ops_for(regions[0]) if regions else CpuOps()
        addrs = target_addresses(manifest, [r.addr for r in regions])
        return cls(manifest.tp_rank, manifest, regions, ops, addrs, import_s=time.monotonic() - t0)

    async def compute_checksums(self) -> list[str]:
        entries = self.manifest.tensors

        def run() -> list[str]:  # one batched launch on a GPU
            return self.ops.checksum_many([(a, e.nbytes) for a, e in zip(self.entry_addrs, entries, strict=True)])

        return await asyncio.to_thread(run)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        for r in self.regions:
            r.close()
