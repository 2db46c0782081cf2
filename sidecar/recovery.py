"""Ranks left by an earlier sidecar of this pod: take over its half-received ranks, finish its partial release."""

from __future__ import annotations

import asyncio
import time

from sidecar.config import Config
from sidecar.contract.messages import Manifest, Reply
from sidecar.engine import EngineRanks
from sidecar.errors import FatalError
from sidecar.logs import Ctx


async def wait_for_loads(cfg: Config, engine: EngineRanks, replies: list[Reply], log: Ctx) -> list[Reply]:
    """Ranks loading from storage (an earlier sidecar's load, or the engine's own): wait until the loads end,
    bounded by MX_LOAD_TIMEOUT, and return the ranks' states then. Exiting instead made every restart during a load
    exit 2 until the load ended: a kubelet back-off of up to 5 minutes on a replica that was nearly ready."""
    loading = [r for r in replies if r.state == "loading"]
    if not loading:
        return replies
    t0 = time.monotonic()
    log.warning("%d ranks are loading from storage (an earlier sidecar's load or the engine's own): waiting for the "
                "load to end (at most MX_LOAD_TIMEOUT=%.0fs), then serving what it loaded", len(loading),
                cfg.load_timeout)
    while any(r.state == "loading" for r in replies):
        if time.monotonic() - t0 > cfg.load_timeout:
            raise FatalError(f"ranks still loading after MX_LOAD_TIMEOUT={cfg.load_timeout:.0f}s")
        # Sleeping is the protocol here: the hook sends no notification, its state comes with each ping.
        await asyncio.sleep(engine.ping_interval())
        replies = await engine.states()
    log.info("phase=await_load %.2fs: ranks are %s", time.monotonic() - t0, [r.state for r in replies])
    return replies


def _busy(replies: list[Reply], session: str) -> list[Reply]:
    return [r for r in replies if r.state in ("receiving", "preparing") and r.owner != session]


async def take_over_orphans(cfg: Config, engine: EngineRanks, replies: list[Reply], log: Ctx) -> None:
    """Ranks prepared by a sidecar that died: wait until the hook agrees it is gone, then void its bytes."""
    if not _busy(replies, engine.session):
        return
    t0 = time.monotonic()
    log.warning("%d ranks were being received by an earlier sidecar; taking them over once the hook sees it "
                "silent for MX_SIDECAR_TIMEOUT (its READs may still land until then)",
                len(_busy(replies, engine.session)))
    while True:
        busy = _busy(await engine.states(), engine.session)
        if not busy:
            break
        if all(r.state == "receiving" and r.owner_silent_s >= cfg.sidecar_timeout for r in busy):
            await engine.all("abort", cfg.request_timeout, [r.manifest.tp_rank for r in busy if r.manifest is not None])
            break
        # Sleeping is the protocol here: the hook's own clock decides when the earlier session is silent.
        wait = max(cfg.sidecar_timeout - min(r.owner_silent_s for r in busy), 0.1)
        await asyncio.sleep(min(wait, engine.ping_interval()))
    log.info("phase=takeover %.2fs: the earlier session's bytes are void", time.monotonic() - t0)


async def finish_partial_release(cfg: Config, engine: EngineRanks, replies: list[Reply], log: Ctx) -> list[Manifest]:
    """An earlier sidecar released some ranks and died: the rest load from storage; returns every rank's manifest."""
    await take_over_orphans(cfg, engine, replies, log)
    rest = [r.manifest.tp_rank for r in await engine.states() if r.state != "ready" and r.manifest is not None]
    log.warning("ranks %s were not released by the earlier sidecar: loading them from storage", rest)
    t0 = time.monotonic()
    await engine.all("load_from_storage", cfg.load_timeout, rest)
    log.info("phase=load_from_storage %.2fs (ranks %s)", time.monotonic() - t0, rest)
    return [r.manifest for r in await engine.states() if r.manifest is not None]
