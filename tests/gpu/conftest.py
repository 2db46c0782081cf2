"""Fixtures shared by the GPU tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A Redis, the small toy checkpoint and a work dir: (redis url, checkpoint, work)."""
    from sidecar.lab.embedded_redis import EmbeddedRedis
    from sidecar.lab.toy_engine import SMALL, make_checkpoint

    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, SMALL)
    with EmbeddedRedis() as r:
        yield r.url, ckpt, tmp_path
