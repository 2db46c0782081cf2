"""The cache's own sidecar: a second `mx-sidecar run` in this container, serving the cache's file-level ranks.

A cache travels through the file path (runtime_hooks/files): a publisher or receiver process-side (here, threads
of this daemon) plus a sidecar daemon on their hook sockets. The pod's daemon is bound to the engine's sockets, so
the cache gets a daemon of its own on `<MX_ZMQ_ADDRESS>-cache` (sidecar.config.cache_address); its life starts
over for each hook set (the receive, then the publication), as it does for a restarted engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import sys

from sidecar.config import Config, cache_address

log = logging.getLogger("mx.compile_cache")

STOP_GRACE_S = 5.0  # within the daemon's own shutdown limit (daemon.SHUTDOWN_LIMIT_S)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the pod's daemon dies, however it dies (Linux prctl
    PR_SET_PDEATHSIG), so the cache's sidecar never outlives it and never serves a cache nobody holds."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def cache_config(cfg: Config) -> Config:
    """The settings the cache's hooks and its daemon run with: the engine's, on the cache's sockets, one rank, named by
    its ranks, no cache of its own (no recursion), no readiness to watch."""
    return dataclasses.replace(cfg, zmq_address=cache_address(cfg.zmq_address), tp_size=1, compile_cache_dir="",
                               engine_ready_url="", model_name="")


class CacheDaemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, "MX_ZMQ_ADDRESS": cache_address(self.cfg.zmq_address), "MX_TP_SIZE": "1",
               "MX_COMPILE_CACHE_DIR": "", "MX_ENGINE_READY_URL": "", "MX_TEST_FAILPOINTS": "",
               "MX_MODEL_NAME": "",  # the cache's ranks name it (`<model>@compile-cache`), not the weights' name
               "MX_METRICS_PORT": "0", "MX_METRICS_HOST": "127.0.0.1",  # not scraped: the pod's daemon counts caches
               # its warnings and errors only: the pod's daemon logs every step of the cache (debug: everything)
               "MX_LOG_LEVEL": "debug" if self.cfg.log_level == "debug" else "warning"}
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sidecar", "run", env=env,
                                                         preexec_fn=_die_with_parent)
        log.info("compile cache: its sidecar runs as process %d on %s", self.proc.pid, env["MX_ZMQ_ADDRESS"])

    @property
    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def stop(self) -> None:
        p = self.proc
        if p is None or p.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)  # it withdraws the cache's record first
        try:
            await asyncio.wait_for(p.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("compile cache: its sidecar %d did not stop in %.0fs; killed", p.pid, STOP_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()
