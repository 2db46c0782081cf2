"""Is the engine serving? MX_ENGINE_READY_URL answers: an http(s) URL with 2xx (vLLM: /health), or a file:// path
that exists. Polled, as the kubelet polls a readiness probe: an HTTP endpoint sends no event."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

PROBE_TIMEOUT_S = 2.0


def probe(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as r:
            status = getattr(r, "status", None)
            return status is None or 200 <= int(status) < 300  # file:// has no status: it opened, it exists
    except (urllib.error.URLError, OSError, ValueError):
        return False


async def wait_ready(url: str, interval: float) -> None:
    """Returns once `url` answers (cancel to stop waiting)."""
    while not await asyncio.to_thread(probe, url):
        await asyncio.sleep(interval)
