"""The Redis key layout, spelled once (the coordinator writes it, `mx-sidecar status` reads it).

P = MX_REDIS_PREFIX, F = replica fingerprint, R = replica id:

  P:F:seed          seeding lease, SET NX PX, value R; renewed while loading
  P:F:sources       set of replica ids that published
  P:F:src:R         the SourceRecord (msgpack), written once, its TTL refreshed by PEXPIRE per beat
  P:F:hb:R          tiny heartbeat (wall time), PX = MX_SOURCE_TTL
  P:F:readers:R     readers currently pulling from R (least-loaded choice)
  P:agent:NAME      NIXL agent metadata of every agent (targets too: sources send them notifications)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerReplica:
    """A key `P:F:<kind>:R` taken apart (fingerprint, replica id)."""

    fingerprint: str
    replica: str


@dataclass(frozen=True)
class RedisKeys:
    prefix: str

    def seed(self, fp: str) -> str:
        return f"{self.prefix}:{fp}:seed"

    def sources(self, fp: str) -> str:
        return f"{self.prefix}:{fp}:sources"

    def record(self, fp: str, replica: str) -> str:
        return f"{self.prefix}:{fp}:src:{replica}"

    def heartbeat(self, fp: str, replica: str) -> str:
        return f"{self.prefix}:{fp}:hb:{replica}"

    def readers(self, fp: str, replica: str) -> str:
        return f"{self.prefix}:{fp}:readers:{replica}"

    def agent(self, name: str) -> str:
        return f"{self.prefix}:agent:{name}"

    # SCAN patterns over every fingerprint (status, file-level targets)
    def every_record(self) -> str:
        return f"{self.prefix}:*:src:*"

    def every_readers(self) -> str:
        return f"{self.prefix}:*:readers:*"

    def every_seed(self) -> str:
        return f"{self.prefix}:*:seed"

    def per_replica(self, key: str, kind: str) -> PerReplica | None:
        """`P:F:<kind>:R` -> its parts; None for a key of another shape (a prefix with ':' or a foreign key)."""
        head = f"{self.prefix}:"
        if not key.startswith(head):
            return None
        parts = key[len(head):].split(":")
        if len(parts) != 3 or parts[1] != kind or not parts[0] or not parts[2]:
            return None
        return PerReplica(parts[0], parts[2])

    def seed_fingerprint(self, key: str) -> str | None:
        """`P:F:seed` -> F; None for another shape."""
        head = f"{self.prefix}:"
        if not key.startswith(head) or not key.endswith(":seed"):
            return None
        fp = key[len(head):-len(":seed")]
        return fp if fp and ":" not in fp else None
