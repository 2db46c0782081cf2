"""Which source a target tries first: same node, then the closest topology, then the least loaded.

Pure, so the fleet simulation (sidecar/lab/fanout_sim.py) ranks sources with this very code. The load is the
readers in flight that targets count in Redis (Coordinator.reader_delta): not sealed, so a forged count can only
make a target pick a busier source. Equal candidates are spread by a per-target hash, not by replica id: a burst of
targets that all see the same counts (they start in the same second) would otherwise all pick the same one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Ranked(Protocol):
    @property
    def replica(self) -> str: ...
    @property
    def same_node(self) -> bool: ...
    @property
    def topology(self) -> str: ...
    @property
    def readers(self) -> int: ...


def shared_levels(a: str, b: str) -> int:
    """How many outer levels two MX_TOPOLOGY labels share (`zone-a/rack-7` and `zone-a/rack-8`: 1)."""
    if not a or not b:
        return 0
    n = 0
    for x, y in zip(a.split("/"), b.split("/"), strict=False):
        if x != y:
            break
        n += 1
    return n


def spread(salt: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}|{replica}".encode(), digest_size=8).digest(), "big")


C = TypeVar("C", bound=Ranked)


def rank_sources(cands: Sequence[C], my_topology: str, salt: str) -> list[C]:
    """Best first: same node, most shared topology levels, fewest readers in flight, then a per-target spread."""
    return sorted(cands, key=lambda c: (not c.same_node, -shared_levels(my_topology, c.topology), c.readers,
                                        spread(salt, c.replica)))
