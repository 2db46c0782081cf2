"""Logging set-up: every line carries model, role, rank and peer where they are known."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        force=True,
    )


class Ctx(logging.LoggerAdapter):  # type: ignore[type-arg]
    """`log.info(...)` with `model=... role=... rank=... peer=...` in front of the message."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        for k in ("rank", "peer"):
            if k in kwargs:
                extra[k] = kwargs.pop(k)
        prefix = " ".join(f"{k}={v}" for k, v in extra.items() if v not in (None, ""))
        return f"[{prefix}] {msg}", kwargs

    def set(self, **fields: Any) -> None:
        assert isinstance(self.extra, dict)
        self.extra.update(fields)
