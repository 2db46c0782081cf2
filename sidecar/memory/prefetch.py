"""Map the engine's memory handles ahead of time, while the role is decided and the engine prepares.

The hook offers each rank's handles as they stand before any load (`exposed` false, no entries). They are
mapped here in a worker thread; the import of the final manifest then takes the mappings whose handle is
unchanged and maps only the rest. Measured before on an H200: 0.19 s to map 451 handles after
`prepare_target`, on the critical path.

Why a prefetched mapping is never a stale one: it is used only for a handle equal to one in the final
manifest. A CUDA IPC handle names one allocation (cudaIpcGetMemHandle returns a new handle for new memory at
a reused address: CUDA runtime docs, checked on the H200 by tests/gpu), and a torch shm file name is unique
per storage. Tensors are located through the final manifest only; unused mappings are closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from sidecar.contract.messages import Handle, Reply
from sidecar.logs import Ctx
from sidecar.memory.regions import Region, import_handle


class HandlePrefetch:
    def __init__(self, nranks: int, log: Ctx) -> None:
        self._nranks = nranks
        self._log = log
        self._offered: dict[int, list[Handle]] = {}
        self._task: asyncio.Task[dict[Handle, Region]] | None = None
        self._closed = False
        self.seconds = 0.0

    def offer(self, rank: int, reply: Reply) -> None:
        """An engine reply (EngineRanks observer): starts the mapping once every rank offered its handles."""
        m = reply.manifest
        if self._task is not None or self._closed or m is None or m.exposed or not m.handles:
            return
        self._offered[rank] = list(m.handles)
        if len(self._offered) == self._nranks:
            handles = [h for r in sorted(self._offered) for h in self._offered[r]]
            self._task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._map, handles))

    def _map(self, handles: list[Handle]) -> dict[Handle, Region]:
        t0 = time.monotonic()
        out: dict[Handle, Region] = {}
        try:
            for h in handles:
                if h not in out:
                    out[h] = import_handle(h)
        except BaseException:
            for r in out.values():
                r.close()
            raise
        self.seconds = time.monotonic() - t0
        return out

    async def take(self) -> dict[Handle, Region]:
        """The mappings made so far (waiting for a mapping in progress); ownership passes to the caller, who
        closes what it does not use. Empty when nothing was offered or the mapping failed (logged)."""
        task, self._task, self._closed = self._task, None, True
        if task is None:
            return {}
        try:
            regions = await task
        except Exception as e:  # an optimisation only: the final import maps every handle itself, and says so
            self._log.warning("mapping handles ahead failed (%s); mapping them after preparation instead", e)
            return {}
        self._log.info("phase=prefetch %.3fs: %d handles mapped while the role was decided and the engine "
                       "prepared", self.seconds, len(regions))
        return regions

    async def aclose(self) -> None:
        task, self._task, self._closed = self._task, None, True
        if task is not None:
            with contextlib.suppress(Exception):
                for r in (await task).values():
                    r.close()
