"""Target: pull every rank from one source, fence, verify. The verdict is the caller's, given only after this
returns, i.e. when no READ into engine memory is in flight (or FenceError made the process exit)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Literal

from sidecar.config import Config
from sidecar.contract.auth import AuthError, Keyring
from sidecar.contract.codec import ProtocolError
from sidecar.contract.messages import RankSource
from sidecar.coordinator import Candidate, Coordinator
from sidecar.engine import EngineRanks
from sidecar.errors import (
    CoordinatorUnavailable,
    DerivedStateMismatch,
    FatalError,
    FenceError,
    PlanError,
    SourceBusy,
    SourceFailed,
    Superseded,
    TransferError,
    VerifyError,
)
from sidecar.failpoints import Failpoints
from sidecar.logs import Ctx
from sidecar.memory.rank_memory import RankMemory
from sidecar.metrics import Metrics
from sidecar.peers import PeerRouter
from sidecar.target.pull import pull_rank
from sidecar.target.verify import StreamingVerifier, verify_derived, verify_rank
from sidecar.transport import Transport

Result = Literal["ok", "verify_failed", "derived_mismatch", "refused_layout", "refused_auth", "source_failed",
                 "busy", "redis_down", "error"]


@dataclass
class Receiver:
    cfg: Config
    coord: Coordinator
    router: PeerRouter
    engine: EngineRanks
    metrics: Metrics
    log: Ctx
    keys: Keyring
    failpoints: Failpoints
    _metas: dict[str, bytes] = field(default_factory=dict)  # source agent -> its metadata, fetched ahead
    _held: list[tuple[Transport, str]] = field(default_factory=list)  # peers loaded ahead, until release_peers

    async def preconnect(self, cand: Candidate, transports: dict[int, Transport]) -> None:
        """Session setup while the engine prepares: fetch the source's agent metadata, load it into the agent each
        rank will use and open the UCX connection, so the first Hello and READ find a connected peer.

        Only the source's side is touched: nothing of ours is registered yet, and nothing may be READ before the
        engine's final manifest is imported and checked against the source's entries (pull_rank)."""
        t0 = time.monotonic()
        try:
            for r in cand.record.ranks:
                tr = transports.get(r.rank)
                if tr is None:
                    continue
                if r.agent not in self._metas:
                    self._metas[r.agent] = await self.coord.get_agent(r.agent)
                self._held.append((tr, tr.add_peer(self._metas[r.agent], r.agent)))
                tr.connect(r.agent)
        except (CoordinatorUnavailable, AuthError, TransferError, ValueError) as e:
            # The receive repeats each step and reports its failure with a cause; here it only costs the overlap.
            self.log.warning("session setup ahead of the engine failed (%s); it runs again at receive", e,
                             peer=cand.record.replica)
            return
        self.log.info("phase=preconnect %.3fs: %d peers loaded and connected while the engine prepares",
                      time.monotonic() - t0, len(self._held), peer=cand.record.replica)

    def release_peers(self) -> None:
        """Drop the peers loaded ahead (a dead source must not stay loaded: it wedged later sessions)."""
        held, self._held = self._held, []
        for tr, name in held:
            tr.remove_peer(name)
        self._metas.clear()

    async def receive_from(self, cand: Candidate, ranks: dict[int, RankMemory]) -> Result:
        """"ok": every rank holds the source's bytes, verified. Else why this source failed ("busy": its staging pass
        was full, no byte moved); nothing is in flight.

        Raises FenceError (READs may still land: the caller must exit without a verdict) and Superseded (a rank is
        no longer ours to write)."""
        rec = cand.record
        peer = rec.replica
        model = self.engine.model
        by_rank = {r.rank: r for r in rec.ranks}
        t0 = time.monotonic()
        result: Result = "ok"
        counted = False
        try:
            if sorted(by_rank) != sorted(ranks) or len(by_rank) != len(rec.ranks):
                raise PlanError(f"source serves ranks {sorted(by_rank)}, we need {sorted(ranks)}")
            metas = {a: self._metas.get(a) or await self.coord.get_agent(a) for a in {r.agent for r in rec.ranks}}
            await self.coord.reader_delta(self.engine.fp, peer, +1)
            counted = True
            total = sum(rm.manifest.total_bytes for rm in ranks.values())
            self.log.info("pulling %.2f GB from %s (%s node)", total / 1e9, peer,
                          "same" if cand.same_node else "other", peer=peer)
            pulled = await self._pull_all(ranks, by_rank, metas)
            moved = [n for n, _ in pulled]
            # Every rank's verification ends before we return, also when one fails: a sibling's checksum thread
            # still reading the memory that a fallback then unmaps killed the sidecar (SIGSEGV, CI 2026-12-07).
            verdicts = await asyncio.gather(*(verify_rank(rm, by_rank[r], v, self.log)
                                              for (r, rm), (_, v) in zip(ranks.items(), pulled, strict=True)),
                                            return_exceptions=True)
            for v in verdicts:
                if isinstance(v, BaseException):
                    raise v
            self._received(sum(moved), time.monotonic() - t0, peer)
            # Every READ is fenced and verified: the engine re-derives its host-side numbers from these bytes.
            verify_derived(rec.ranks, await self.engine.replies("derive", self.cfg.load_timeout), self.log)
            return "ok"
        except (FenceError, Superseded, FatalError):  # FatalError: the engine failed (derive) or refused us
            result = "error"
            raise
        except DerivedStateMismatch as e:
            result = "derived_mismatch"
            self.log.error("derived state differs: %s; next source, then storage", e, peer=peer)
        except VerifyError as e:
            result = "verify_failed"
            self.log.error("verification failed: %s", e, peer=peer)
        except AuthError as e:
            result = "refused_auth"
            self.log.warning("source refused before any byte moved: %s", e, peer=peer)
        except (PlanError, ProtocolError) as e:
            result = "refused_layout"
            self.log.warning("source refused before any byte moved: %s", e, peer=peer)
        except SourceBusy as e:
            result = "busy"
            self.log.info("%s; waiting for a place or another source", e, peer=peer)
        except SourceFailed as e:
            result = "source_failed"
            self.log.warning("source failed: %s", e, peer=peer)
        except CoordinatorUnavailable as e:
            result = "redis_down"
            self.metrics.redis_errors.labels(model, "receive").inc()
            self.log.warning("Redis unavailable during receive: %s", e, peer=peer)
        except Exception:  # a bug or an unforeseen NIXL error: counted and logged loudly, next candidate
            result = "error"
            self.log.exception("transfer failed unexpectedly", peer=peer)
        finally:
            self.metrics.transfers.labels(model, "target", result).inc()
            if counted:
                with contextlib.suppress(CoordinatorUnavailable):
                    await self.coord.reader_delta(self.engine.fp, peer, -1)
        return result

    def _received(self, moved: int, dt: float, peer: str) -> None:
        model = self.engine.model
        gbps = moved / 1e9 / max(dt, 1e-9)
        self.metrics.transfer_seconds.labels(model, "target").observe(dt)
        self.metrics.last_rate.labels(model, "target").set(gbps * 1e9)
        self.log.info("phase=receive %.2f GB in %.2fs (%.2f GB/s), every checksum verified", moved / 1e9, dt, gbps,
                      peer=peer)
        if gbps < self.cfg.slow_link_gbps and moved > 256 << 20:
            self.log.warning("transfer ran at %.2f GB/s, below MX_SLOW_LINK_GBPS=%.2f: check UCX_TLS / the "
                             "fabric (UCX may have fallen back to TCP)", gbps, self.cfg.slow_link_gbps)

    async def _pull_one(self, r: int, rm: RankMemory, src: RankSource, meta: bytes) -> tuple[int, StreamingVerifier]:
        try:
            return await pull_rank(self.cfg, rm, src, meta, self.router, self.metrics, self.log, self.keys,
                                   self.engine.write_guard(r), self.failpoints)
        except FenceError:
            # Recorded here, in the rank's own task: a cancelled gather above it would report CancelledError only.
            self.engine.unfenced.add(r)
            raise

    async def _pull_all(self, ranks: dict[int, RankMemory], by_rank: dict, metas: dict) -> list:  # type: ignore[type-arg]
        tasks = [asyncio.ensure_future(self._pull_one(r, rm, by_rank[r], metas[by_rank[r].agent]))
                 for r, rm in ranks.items()]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            # One rank failed: stop the others; each drains its READs in its own `finally` before anything else
            # (a retry, a fallback load) touches engine memory. A sibling that cannot confirm its drain wins.
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, tuple):  # a sibling that finished: its checksum thread may still read our memory
                    r[1].close()
            for r in results:
                if isinstance(r, FenceError):
                    raise r from None
            raise
