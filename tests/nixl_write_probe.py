"""Two roles in two processes, through the sidecar's own Transport (NIXL, UCX, progress thread off):

victim   : maps 2 MiB; registers the first MiB (0xAA) exactly as a source registers engine memory, leaves the
           second MiB (0xCC) unregistered; writes its agent metadata (what Redis holds) and the address to files,
           keeps driving NIXL progress (as the sidecar's event loop does), then prints what both halves hold.
attacker : knows only that metadata (the address is inside it too); loads it and tries one-sided WRITEs of 0x55:
           (1) into the registered MiB, (2) into the unregistered MiB, (3) the same with the metadata's
           registered length doubled (a forged copy: the bounds are the attacker's own NIXL's check).

`python -m tests.nixl_write_probe victim DIR SECONDS` / `... attacker DIR`. Output: one JSON line.
"""

from __future__ import annotations

import json
import mmap
import sys
import time
from pathlib import Path

import numpy as np

from sidecar.transport import Transport

NBYTES = 1 << 20


def victim(d: Path, seconds: float) -> dict[str, object]:
    t = Transport("victim", "DRAM", 0)
    buf = mmap.mmap(-1, 2 * NBYTES)  # anonymous shared mapping, as the engine's shm-backed tensors
    both = np.frombuffer(buf, dtype=np.uint8)
    arr, unregistered = both[:NBYTES], both[NBYTES:]
    arr[:] = 0xAA
    unregistered[:] = 0xCC
    addr = arr.ctypes.data
    t.agent.register_memory(np.array([(addr, NBYTES, 0)], dtype=np.uint64), "DRAM")
    md = t.metadata()
    (d / "victim.md").write_bytes(md)
    (d / "victim.addr").write_text(str(addr))
    (d / "victim.ready").write_text("1")
    deadline = time.monotonic() + seconds
    notes: list[str] = []
    while time.monotonic() < deadline:
        for _, msgs in t.agent.get_new_notifs().items():  # progress, as the sidecar's pump does
            notes += [bytes(m).decode(errors="replace") for m in msgs]
        if (d / "attacker.done").exists():
            time.sleep(0.2)  # let the last in-flight messages land
            for _, msgs in t.agent.get_new_notifs().items():
                notes += [bytes(m).decode(errors="replace") for m in msgs]
            break
        time.sleep(0.005)
    return {"role": "victim", "address": addr, "metadata_bytes": len(md),
            "address_in_metadata": addr.to_bytes(8, "little") in md,
            "registered_0x55": int((arr == 0x55).sum()), "registered_0xAA": int((arr == 0xAA).sum()),
            "unregistered_0x55": int((unregistered == 0x55).sum()), "notifs": notes}


def victim_addr(d: Path, timeout: float = 60) -> tuple[bytes, int]:
    deadline = time.monotonic() + timeout
    while not (d / "victim.ready").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("victim never published its metadata")
        time.sleep(0.02)
    return (d / "victim.md").read_bytes(), int((d / "victim.addr").read_text())


def _write(t: Transport, local: np.ndarray, remote: np.ndarray, peer: str, notif: bytes) -> str:
    try:
        lo = t.agent.get_xfer_descs(local, "DRAM")
        re = t.agent.get_xfer_descs(remote, "DRAM")
        h = t.agent.initialize_xfer("WRITE", lo, re, peer, notif)
        state = t.agent.transfer(h)
        deadline = time.monotonic() + 20
        while state not in ("DONE", "ERR") and time.monotonic() < deadline:
            state = t.agent.check_xfer_state(h)
            time.sleep(0.001)
        return str(state)
    except Exception as e:  # NIXL raises for descriptors outside the remote's registered memory
        return f"refused: {type(e).__name__}: {e}"


def forge_length(md: bytes, addr: int, nbytes: int, new_nbytes: int) -> bytes:
    """The metadata with the registered section [addr, addr+nbytes) claimed as [addr, addr+new_nbytes)."""
    old = addr.to_bytes(8, "little") + nbytes.to_bytes(8, "little")
    assert md.count(old) == 1, "section descriptor not found in the metadata"
    return md.replace(old, addr.to_bytes(8, "little") + new_nbytes.to_bytes(8, "little"))


def attacker(d: Path) -> dict[str, object]:
    md, addr = victim_addr(d)
    t = Transport("attacker", "DRAM", 0)
    peer = t.add_peer(md, "victim")
    src = np.full(NBYTES, 0x55, dtype=np.uint8)
    local = np.array([(src.ctypes.data, NBYTES, 0)], dtype=np.uint64)
    t.agent.register_memory(local, "DRAM")
    past_end = np.array([(addr + NBYTES, NBYTES, 0)], dtype=np.uint64)
    inside = _write(t, local, np.array([(addr, NBYTES, 0)], dtype=np.uint64), peer, b"inside")
    outside = _write(t, local, past_end, peer, b"outside")
    t.remove_peer(peer)
    peer = t.add_peer(forge_length(md, addr, NBYTES, 2 * NBYTES), "victim")
    forged = _write(t, local, past_end, peer, b"forged")
    (d / "attacker.done").write_text("1")
    return {"role": "attacker", "write_registered": inside, "write_unregistered": outside,
            "write_unregistered_with_forged_metadata": forged}


def main(argv: list[str]) -> int:
    role, d = argv[0], Path(argv[1])
    out = victim(d, float(argv[2])) if role == "victim" else attacker(d)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
