"""Where a reader session's setup time goes, with the sidecar's own Transport (NIXL agents), two agents in one
process: A plays the source (a registered 256 MiB slot), B the target (a registered buffer).

Measured: agent creation, registration, B loading A's metadata (add_peer), the first notification each way (UCX
connects on first use) and later ones, the first small READ on the new connection (rkey unpack / remote mapping)
and later ones, a whole-slot READ, and a new session's cost when the peer is removed and added again (today's
behaviour: a reader drops its remote agents when a load ends) against keeping it. Polling is tight here; the
daemon's idle notification pump polls every IDLE_POLL_S (sidecar/transport.py), which a real Hello also waits for.

    python3 tests/gpu/setup_probe.py [--dram]     -> $OUT/setup_probe.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SLOT = 256 << 20
SMALL = 4096


def _wait_notif(agent: Any, want: bytes, sender: Any, timeout: float = 10.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        sender.get_new_notifs()  # progress on the sending side too (no progress thread: the daemon's pumps do it)
        for msgs in agent.get_new_notifs().values():
            if any(bytes(m) == want for m in msgs):
                return time.perf_counter() - t0
    raise TimeoutError(f"notification {want!r} not seen")


def main() -> int:
    import numpy as np

    from sidecar.memory.regions import CpuOps
    from sidecar.transport import Transport

    dram = "--dram" in sys.argv
    if not dram:
        from sidecar.memory.cuda import CudaOps, visible_device_count

        dram = visible_device_count() == 0
    ops: Any = CpuOps() if dram else CudaOps(0, warm=False)
    mem = "DRAM" if dram else "VRAM"
    rep: dict[str, Any] = {"mem": mem}
    t0 = time.perf_counter()
    a = Transport("probe-a", mem, 0)
    rep["agent_create_s"] = time.perf_counter() - t0
    b = Transport("probe-b", mem, 0)
    slot, buf = ops.alloc(SLOT), ops.alloc(SLOT)
    try:
        rep["register_s"] = a.register([slot]) + b.register([buf])
        meta_a, meta_b = a.metadata(), b.metadata()
        rep["metadata_bytes"] = len(meta_a)

        def timed(fn: Any) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        def read(n: int, peer: str) -> float:
            local = np.array([(buf.addr, n, 0)], dtype=np.uint64)
            remote = np.array([(slot.addr, n, 0)], dtype=np.uint64)
            t = time.perf_counter()
            h = b.start_read(local, remote, peer, mem)
            while not b.poll(h):
                a.agent.get_new_notifs()  # the serving side progresses too (TCP emulation needs it)
                if time.perf_counter() - t > 60:
                    raise TimeoutError("READ did not finish")
            return time.perf_counter() - t

        rep["target_add_peer_s"] = timed(lambda: b.add_peer(meta_a, "probe-a"))
        t = time.perf_counter()
        b.send("probe-a", b"hello-1")
        rep["first_notif_target_to_source_s"] = time.perf_counter() - t + _wait_notif(a.agent, b"hello-1", b.agent)
        rep["source_add_peer_s"] = timed(lambda: a.add_peer(meta_b, "probe-b"))
        t = time.perf_counter()
        a.send("probe-b", b"welcome-1")
        rep["first_notif_source_to_target_s"] = time.perf_counter() - t + _wait_notif(b.agent, b"welcome-1", a.agent)
        rtts = []
        for i in range(5):
            t = time.perf_counter()
            b.send("probe-a", f"h{i}".encode())
            _wait_notif(a.agent, f"h{i}".encode(), b.agent)
            a.send("probe-b", f"w{i}".encode())
            _wait_notif(b.agent, f"w{i}".encode(), a.agent)
            rtts.append(time.perf_counter() - t)
        rep["notif_round_trip_s"] = min(rtts)
        rep["first_small_read_s"] = read(SMALL, "probe-a")
        rep["next_small_read_s"] = min(read(SMALL, "probe-a") for _ in range(5))
        rep["first_slot_read_s"] = read(SLOT, "probe-a")
        rep["next_slot_read_s"] = min(read(SLOT, "probe-a") for _ in range(2))
        # A new session today: the reader removed the source's agent when its last load ended.
        b.remove_peer("probe-a")
        rep["readd_peer_s"] = timed(lambda: b.add_peer(meta_a, "probe-a"))
        rep["small_read_after_readd_s"] = read(SMALL, "probe-a")
        rep["setup_paid_per_new_session_s"] = rep["readd_peer_s"] + rep["small_read_after_readd_s"] - \
            rep["next_small_read_s"]
    finally:
        a.close()
        b.close()
        slot.close()
        buf.close()
    rep = {k: round(v, 6) if isinstance(v, float) else v for k, v in rep.items()}
    out = Path(os.environ.get("OUT", ".gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "setup_probe.json").write_text(json.dumps(rep, indent=1))
    print(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
