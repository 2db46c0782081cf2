"""Named fault-injection points, enabled only by MX_TEST_FAILPOINTS (tests), as etcd and TiKV do.

`MX_TEST_FAILPOINTS="keepalive=raise,before_read=sleep:3"`: at `fp.hit("keepalive")` raise, at
`await fp.ahit("before_read")` sleep 3 s. Unset (production): every hit is one dict lookup.
An action may be limited to the n-th hit: `before_read=raise@5` raises on the fifth hit only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("mx.failpoints")

ACTIONS = ("raise", "sleep")


class FailpointError(RuntimeError):
    pass


@dataclass
class _Point:
    action: str
    arg: float
    at: int  # 0: every hit
    hits: int = 0


class Failpoints:
    def __init__(self, spec: str = "") -> None:
        self._points: dict[str, _Point] = {}
        for item in filter(None, (x.strip() for x in spec.split(","))):
            name, _, rest = item.partition("=")
            rest, _, at = rest.partition("@")
            action, _, arg = rest.partition(":")
            if not name or action not in ACTIONS:
                raise ValueError(f"failpoint {item!r}: expected name=raise|sleep:SECONDS[@N]")
            self._points[name] = _Point(action, float(arg or 0), int(at or 0))
        if self._points:
            log.warning("TEST FAILPOINTS ENABLED: %s", ", ".join(sorted(self._points)))

    def _fire(self, name: str) -> _Point | None:
        p = self._points.get(name)
        if p is None:
            return None
        p.hits += 1
        if p.at and p.hits != p.at:
            return None
        log.warning("failpoint %s: %s", name, p.action)
        if p.action == "raise":
            raise FailpointError(f"failpoint {name}")
        return p

    def hit(self, name: str) -> None:
        p = self._fire(name)
        if p is not None:
            time.sleep(p.arg)

    async def ahit(self, name: str) -> None:
        p = self._fire(name)
        if p is not None:
            await asyncio.sleep(p.arg)
