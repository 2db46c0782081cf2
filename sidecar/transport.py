"""One NIXL agent per device: registration, READs, notifications, all driven from the event loop.

NIXL's own progress thread busy-spins a whole core even when idle (measured on the CPU machines),
so it is off: this module calls the agent's progress (`get_new_notifs`, `check_xfer_state`) from
asyncio, tightly while something is in flight and every IDLE_POLL_S otherwise. NIXL offers no file
descriptor to wait on, so a gentle idle poll is the event source we have.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np

from sidecar.errors import TransferError
from sidecar.failpoints import Failpoints
from sidecar.logs import adopt_logger
from sidecar.memory.regions import Region
from sidecar.settings import UCX_ENV_DEFAULTS

log = logging.getLogger("mx.transport")

# An idle source notices a reader's Hello after IDLE_POLL_S/2 on average: it was 20 ms, a third of the 75 ms of
# session setup measured on the H200. One poll costs 0.7 us in NIXL (plus the loop's wake-up): 5 ms is noise.
IDLE_POLL_S = 0.005
BUSY_POLL_S = 0.0002


def _nixl_api() -> Any:
    # Depend on one CUDA flavour directly: the `nixl` meta package pulls both, and they cannot share a process.
    for mod in ("nixl_cu13._api", "nixl_cu12._api", "nixl._api"):
        try:
            api = __import__(mod, fromlist=["nixl_agent"])
        except ImportError:
            continue
        adopt_logger("nixl")  # NIXL configures its own stdout handler on import: its lines join ours
        return api
    raise ImportError("no NIXL found: install nixl-cu13 (or nixl-cu12)")



class Transport:
    """A NIXL agent for one memory space (host DRAM, or one GPU)."""

    def __init__(self, name: str, mem_type: str, device_id: int) -> None:
        api = _nixl_api()
        for k, v in UCX_ENV_DEFAULTS.items():  # read by UCX when the agent starts; an operator's value wins
            os.environ.setdefault(k, v)
        t0 = time.monotonic()
        cfg = api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
        self.agent = api.nixl_agent(name, cfg)
        self.create_s = time.monotonic() - t0
        self.name = name
        self.mem_type = mem_type
        self.device_id = device_id
        self.registered_bytes = 0
        self._reg: list[Any] = []
        self._busy = 0
        self._on_notif: Callable[[str, bytes], None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._peers: dict[str, int] = {}  # remote agent -> sessions using it
        log.info("NIXL agent %s (%s dev %d) created in %.2fs", name, mem_type, device_id, self.create_s)

    # -------------------------------------------------------------- memory
    def register(self, regions: list[Region]) -> Registration:
        """Register each region once (per allocation segment, not per tensor)."""
        regions = [r for r in regions if r.nbytes > 0]
        if not regions:
            return Registration(None, 0, 0.0)
        t0 = time.monotonic()
        arr = np.array([(r.addr, r.nbytes, r.device_id) for r in regions], dtype=np.uint64)
        descs = self.agent.register_memory(arr, self.mem_type)
        self._reg.append(descs)
        n = sum(r.nbytes for r in regions)
        self.registered_bytes += n
        return Registration(descs, n, time.monotonic() - t0)

    def deregister(self, reg: Registration) -> None:
        """Undo one register(): before its memory is unmapped (a fallback re-import, a dropped ring)."""
        if reg.descs is None or not any(d is reg.descs for d in self._reg):
            return
        self._reg = [d for d in self._reg if d is not reg.descs]
        self.registered_bytes -= reg.nbytes
        self.agent.deregister_memory(reg.descs)
        reg.descs = None

    def metadata(self) -> bytes:
        return bytes(self.agent.get_agent_metadata())

    # -------------------------------------------------------------- peers
    def add_peer(self, metadata: bytes, expected_name: str) -> str:
        """Load a remote agent, shared by the sessions that use it (one per rank on a shared agent).

        Re-adding metadata under a name in use would invalidate that name's transfers in flight
        (measured: NIXL_ERR_NOT_FOUND on the sibling rank), so a loaded peer is reference-counted.
        """
        if expected_name in self._peers:
            self._peers[expected_name] += 1
            return expected_name
        try:
            name = self.agent.add_remote_agent(metadata)
        except Exception as e:  # NIXL_ERR_BACKEND when UCX cannot reach a dead peer
            raise TransferError(f"cannot load remote agent {expected_name}: {e}") from e
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name != expected_name:
            self._drop(name)
            raise ValueError(f"metadata names agent {name!r}, expected {expected_name!r}")
        self._peers[name] = 1
        return name

    def connect(self, name: str) -> None:
        """Establish the UCX connection to a loaded peer now, not on the first notification or READ (measured on
        the H200: the first notification to a new peer took 11 ms, the next 0.02 ms)."""
        try:
            self.agent.make_connection(name)
        except Exception as e:
            raise TransferError(f"cannot connect to {name}: {e}") from e

    def remove_peer(self, name: str) -> None:
        # A reader drops its remote agents as soon as a load ends, or a wedged source stays wedged for others.
        if name not in self._peers:
            return
        self._peers[name] -= 1
        if self._peers[name] <= 0:
            del self._peers[name]
            self._drop(name)

    def _drop(self, name: str) -> None:
        try:
            self.agent.remove_remote_agent(name)
        except Exception as e:  # already gone on the NIXL side: nothing left to release
            log.debug("remove_remote_agent(%s): %s", name, e)

    def send(self, peer: str, msg: bytes) -> None:
        try:
            self.agent.send_notif(peer, msg)
        except Exception as e:
            raise TransferError(f"notification to {peer} failed: {e}") from e

    # -------------------------------------------------------------- progress
    def start(self, on_notif: Callable[[str, bytes], None],
              spawn: Callable[[str, Coroutine[Any, Any, None]], asyncio.Task[None]] | None = None,
              failpoints: Failpoints | None = None) -> None:
        """Start pumping notifications; `spawn` (the daemon's supervisor) makes a dead pump fatal."""
        self._on_notif = on_notif
        coro = self._pump_notifs(failpoints or Failpoints())
        self._pump = spawn("nixl_pump", coro) if spawn else asyncio.get_running_loop().create_task(coro)

    async def _pump_notifs(self, fp: Failpoints) -> None:
        while True:
            fp.hit("task.nixl_pump")
            notifs = self.agent.get_new_notifs()
            for peer, msgs in notifs.items():
                for m in msgs:
                    if self._on_notif is not None:
                        self._on_notif(peer if isinstance(peer, str) else peer.decode(), bytes(m))
            await asyncio.sleep(BUSY_POLL_S if self._busy else IDLE_POLL_S)

    def busy(self) -> _Busy:
        return _Busy(self)

    # -------------------------------------------------------------- transfers
    def start_read(self, local: np.ndarray, remote: np.ndarray, peer: str, remote_mem_type: str,
                   notif: bytes = b"") -> Any:
        lo = self.agent.get_xfer_descs(local, self.mem_type)
        re = self.agent.get_xfer_descs(remote, remote_mem_type)
        try:
            handle = self.agent.initialize_xfer("READ", lo, re, peer, notif)
        except Exception as e:
            raise TransferError(f"READ from {peer} failed to start: {e}") from e
        try:
            state = self.agent.transfer(handle)
        except Exception as e:  # the handle exists: release it, or it leaks (seen on every failed start)
            self._release(handle)
            raise TransferError(f"READ from {peer} failed to start: {e}") from e
        if state == "ERR":
            self._release(handle)
            raise TransferError(f"READ from {peer} failed to start")
        return handle

    def disconnect(self, name: str) -> None:
        """Drop a remote agent whatever its reference count: its endpoint closes and its requests fail."""
        self._peers.pop(name, None)
        self._drop(name)

    def poll(self, handle: Any) -> bool:
        """True when done; raises on error (a killed peer shows as NIXL_ERR_REMOTE_DISCONNECT)."""
        try:
            state = self.agent.check_xfer_state(handle)
        except Exception as e:
            self._release(handle)
            raise TransferError(f"transfer failed: {e}") from e
        if state == "DONE":
            self._release(handle)
            return True
        if state == "ERR":
            self._release(handle)
            raise TransferError("transfer reported ERR")
        return False

    def _release(self, handle: Any) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception as e:  # a handle of a dead peer may refuse release; it is dropped either way
            log.debug("release_xfer_handle: %s", e)

    def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        for name in list(self._peers):
            self._drop(name)
        self._peers.clear()
        for reg in self._reg:
            try:
                self.agent.deregister_memory(reg)
            except Exception as e:
                log.debug("deregister_memory: %s", e)
        self._reg.clear()


@dataclass
class Registration:
    descs: Any
    nbytes: int
    seconds: float


class _Busy:
    """Context manager: poll tightly while a transfer or a session is in flight."""

    def __init__(self, t: Transport) -> None:
        self._t = t

    def __enter__(self) -> None:
        self._t._busy += 1

    def __exit__(self, *exc: object) -> None:
        self._t._busy -= 1
