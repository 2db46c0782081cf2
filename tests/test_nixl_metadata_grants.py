"""What an agent's NIXL metadata (what Redis holds under P:agent:NAME) grants its holder, through real NIXL/UCX.

Two processes (tests/nixl_write_probe.py), the sidecar's own Transport, DRAM: a victim registers 1 MiB of a 2 MiB
mapping; an attacker that has only the victim's metadata WRITEs into it. Run once per UCX transport: `cma,tcp`
(two processes on one host: UCX picks CMA for RMA) and `tcp` (what a peer on another node without RDMA uses).
The findings are written up in docs/SECURITY-NIXL.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nixl_write_probe import NBYTES

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", params=["cma,tcp", "tcp"])
def probe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[dict[str, object], dict[str, object]]]:
    d: Path = tmp_path_factory.mktemp("nixl-probe")
    env = {**os.environ, "UCX_TLS": request.param}
    cmd = [sys.executable, "-m", "tests.nixl_write_probe"]
    victim = subprocess.Popen([*cmd, "victim", str(d), "60"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        attacker = subprocess.run([*cmd, "attacker", str(d)], env=env, capture_output=True, text=True, timeout=120)
        out_v, _ = victim.communicate(timeout=90)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert attacker.returncode == 0, attacker.stderr[-2000:]
    yield json.loads(out_v.strip().splitlines()[-1]), json.loads(attacker.stdout.strip().splitlines()[-1])


def test_a_holder_of_agent_metadata_can_write_registered_memory(probe):
    victim, attacker = probe
    assert attacker["write_registered"] == "DONE"
    assert victim["registered_0x55"] == NBYTES and victim["registered_0xAA"] == 0, "every registered byte overwritten"
    assert "inside" in victim["notifs"]  # the WRITE even announces itself: nothing on the victim's side refused it


def test_the_metadata_itself_holds_the_registered_addresses(probe):
    victim, _ = probe
    assert victim["address_in_metadata"], "no address from a source record is needed to aim a WRITE"


def test_nixl_bounds_writes_only_on_the_writers_side_a_forged_copy_writes_unregistered_memory(probe):
    victim, attacker = probe
    assert str(attacker["write_unregistered"]).startswith("refused: nixlNotFoundError")  # the honest client's check
    assert attacker["write_unregistered_with_forged_metadata"] == "DONE"
    assert victim["unregistered_0x55"] == NBYTES, "CMA and UCX's TCP RMA emulation enforce no registration bounds"


# ------------------------------------------------------------------------------------------------ the product


def _registered_sections(md: bytes) -> list[tuple[int, int]]:
    """(addr, nbytes) of every registered section in an agent's metadata blob, as an attacker would find them:
    NIXL serializes each descriptor as little-endian addr, len, devId (0 for DRAM)."""
    out = set()
    for i in range(len(md) - 24):
        addr, ln, dev = (int.from_bytes(md[i + k:i + k + 8], "little") for k in (0, 8, 16))
        if dev == 0 and 0 < ln < 1 << 36 and 1 << 40 <= addr < 1 << 47:
            out.add((addr, ln))
    return sorted(out)


@pytest.mark.parametrize("mode", ["direct", "staged"])
def test_a_metadata_holder_overwrites_a_direct_sources_engine_memory_but_a_staged_source_exposes_only_its_ring(
        replicas, redis_server, mode):
    """Direct mode registers engine memory and its metadata lists every section: a holder can overwrite it.
    A staged source deregisters engine memory once its ring serves: its metadata lists the ring's slots only."""
    import re

    import numpy as np
    import redis

    from sidecar.contract.codec import decode
    from sidecar.contract.messages import Sealed, SourceRecord
    from sidecar.transport import Transport
    from tests.test_end_to_end import _assert_fell_back_to_storage

    env = {"MX_HEARTBEAT_INTERVAL": "5", "MX_SOURCE_TTL": "30", "MX_SOURCE_MODE": mode,
           "MX_STAGING_SLOTS": "2", "MX_STAGING_SLOT_BYTES": "1MiB"}
    a = replicas("a", extra_env=env)
    res_a = a.engine_results()
    a.wait_serving()
    handles = int(re.search(r"of (\d+) handles", "\n".join(a.sidecar.lines)).group(1))
    r = redis.Redis.from_url(redis_server.url)
    rec = decode(SourceRecord, decode(Sealed, r.get(next(iter(r.scan_iter("mx:*:src:*"))))).body)
    agent = rec.ranks[0].agent
    md = decode(Sealed, r.get(f"mx:agent:{agent}")).body
    slots = {tuple(s) for rank in rec.ranks for s in rank.slots}
    engine = [s for s in _registered_sections(md) if s not in slots]
    assert all(rank.mode == mode for rank in rec.ranks)
    if mode == "staged":
        assert engine == [] and slots, "a staged source exposes its ring, never engine memory"
        b = replicas("b", extra_env=env)
        assert b.engine_results()[0]["digests"] == res_a[0]["digests"]
        return
    assert len(engine) == handles, "every engine region is listed in the metadata Redis holds"
    addr, nbytes = max(engine, key=lambda s: s[1])
    intruder = Transport("intruder", "DRAM", 0)
    try:
        peer = intruder.add_peer(md, agent)
        junk = np.full(nbytes, 0x55, dtype=np.uint8)
        local = np.array([(junk.ctypes.data, nbytes, 0)], dtype=np.uint64)
        intruder.agent.register_memory(local, "DRAM")
        handle = intruder.agent.initialize_xfer("WRITE", intruder.agent.get_xfer_descs(local, "DRAM"),
                                                intruder.agent.get_xfer_descs(
                                                    np.array([(addr, nbytes, 0)], dtype=np.uint64), "DRAM"), peer)
        state = intruder.agent.transfer(handle)
        while state not in ("DONE", "ERR"):
            state = intruder.agent.check_xfer_state(handle)
        assert state == "DONE"
    finally:
        intruder.close()
    # The source still publishes its load-time checksums, but its engine now holds the intruder's bytes: a new
    # replica receives them, fails verification and loads from storage (without verification it would serve them).
    b = replicas("b", extra_env=env)
    _assert_fell_back_to_storage(b, res_a, "verify_failed")
