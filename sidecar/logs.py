"""Logging set-up: every line carries model, role, rank and peer where they are known; as text or as JSON
(MX_LOG_FORMAT), with the same fields."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_PHASE = re.compile(r"\bphase=(\w+)(?: ([\d.]+)s)?")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the context fields (model, role, rank, peer) and, for a
    `phase=<step> <seconds>` line, phase and phase_s; exc for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        fields: dict[str, Any] = dict(getattr(record, "mx_fields", {}))
        if fields and msg.startswith("["):
            msg = msg.split("] ", 1)[-1]  # the text prefix, carried as fields instead
        doc: dict[str, Any] = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
                               **fields, "msg": msg}
        m = _PHASE.search(msg)
        if m:
            doc["phase"] = m.group(1)
            if m.group(2):
                doc["phase_s"] = float(m.group(2))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def adopt_logger(name: str) -> None:
    """A library logger that set up its own handler (NIXL: its own format, on stdout) writes through ours instead,
    so that one format holds for every line (a JSON log parser fails on a single foreign line)."""
    root = logging.getLogger()
    if not root.handlers:
        return
    lg = logging.getLogger(name)
    lg.handlers = list(root.handlers)
    lg.propagate = False


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class Ctx(logging.LoggerAdapter):  # type: ignore[type-arg]
    """`log.info(...)` with `model=... role=... rank=... peer=...` in front of the message."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        for k in ("rank", "peer"):
            if k in kwargs:
                extra[k] = kwargs.pop(k)
        known = {k: v for k, v in extra.items() if v not in (None, "")}
        kwargs["extra"] = {**kwargs.get("extra", {}), "mx_fields": known}
        prefix = " ".join(f"{k}={v}" for k, v in known.items())
        return f"[{prefix}] {msg}", kwargs

    def set(self, **fields: Any) -> None:
        assert isinstance(self.extra, dict)
        self.extra.update(fields)
