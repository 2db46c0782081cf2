import itertools

import msgspec
import numpy as np
import pytest

from sidecar.contract.messages import Manifest, ShmHandle, TensorEntry, layout_digest
from sidecar.errors import PlanError
from sidecar.planner import check_compatible, chunk_plan, make_plan, target_addresses


def _entries(sizes):
    return [TensorEntry(f"t{i:03d}", "uint8", [n], -1 if n == 0 else 0, 0, n) for i, n in enumerate(sizes)]


def _manifest(sizes, fp="fp"):
    off, entries = 0, []
    for i, n in enumerate(sizes):
        entries.append(TensorEntry(f"t{i:03d}", "uint8", [n], 0 if n else -1, off if n else 0, n))
        off += n
    return Manifest("m", "r", fp, 0, 1, "shm", True, layout_digest(entries), [ShmHandle("h", 0, max(off, 1))], entries)


@pytest.mark.parametrize("sizes,chunk", [([10, 0, 5000, 1, 300], 1024), ([4096] * 7, 4096), ([1 << 20], 4096),
                                         ([3, 5, 7, 11] * 50, 256)])
def test_chunk_plan_covers_every_byte_exactly_once_within_slots(sizes, chunk):
    entries = _entries(sizes)
    plan = chunk_plan(entries, chunk)
    covered = {i: 0 for i in range(len(entries))}
    for c in plan:
        assert 0 < c.nbytes <= chunk
        ends = sorted((p.slot_offset, p.slot_offset + p.nbytes) for p in c.pieces)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ends)), "pieces overlap in the slot"
        assert ends[-1][1] <= chunk
        for p in c.pieces:
            assert p.entry_offset == covered[p.entry], "pieces of an entry out of order"
            covered[p.entry] += p.nbytes
    assert [covered[i] for i in range(len(entries))] == sizes


def test_different_layouts_are_refused_before_any_descriptor_exists():
    src, tgt = _manifest([16, 32]), _manifest([16, 48])
    with pytest.raises(PlanError, match="layouts differ"):
        check_compatible(src, tgt)
    with pytest.raises(PlanError, match="fingerprints differ"):
        check_compatible(_manifest([16, 32], fp="other"), _manifest([16, 32]))


def test_a_forged_source_entry_cannot_stretch_a_target_write():
    tgt = _manifest([16, 32])
    forged_entries = [msgspec.structs.replace(e, nbytes=e.nbytes * 4) for e in tgt.tensors]
    forged = msgspec.structs.replace(tgt, tensors=forged_entries, layout_digest=tgt.layout_digest)
    with pytest.raises(PlanError):
        check_compatible(forged, tgt)


def test_local_descriptors_stay_inside_the_targets_own_tensors():
    tgt = _manifest([100, 0, 700, 3])
    addrs = target_addresses(tgt, [1_000_000])
    plan = make_plan(tgt.tensors, addrs, 0, None, 0, 256)  # staged: the whole plan before any READ
    lo_hi = [(a, a + e.nbytes) for a, e in zip(addrs, tgt.tensors, strict=True) if e.nbytes]
    for k in range(len(plan.chunks)):
        local, remote = plan.descriptors(k, 5_000_000)
        assert local.dtype == np.uint64 and local.shape == remote.shape
        for addr, n, _ in local:
            assert any(lo <= addr and addr + n <= hi for lo, hi in lo_hi)
        for addr, n, _ in remote:
            assert addr >= 5_000_000 and addr + n <= 5_000_000 + 256
