"""The sidecar's side of the hook<->sidecar session, for every engine rank.

Connects to each rank, sends engine-changing commands under this process's session, and pings every
rank on its own schedule, also while a long command is outstanding. Every ping reply is the rank's
truth: a target stops issuing READs the moment a rank is not `receiving` under our session or our
lease on it went stale (write_guard); a source is told of every reply so it can withdraw at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import zmq.asyncio

from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.messages import Manifest, Reply, replica_fingerprint
from sidecar.contract.session import new_session_id
from sidecar.errors import EngineError, EngineGone, FatalError
from sidecar.failpoints import Failpoints
from sidecar.link import EngineLink
from sidecar.logs import Ctx
from sidecar.metrics import Metrics

ENGINE_PING_FAILURES = 3




class EngineRanks:
    def __init__(self, cfg: Config, keys: Keyring, metrics: Metrics, log: Ctx, failpoints: Failpoints) -> None:
        self.cfg = cfg
        self.session = new_session_id()
        self._keys = keys
        self._m = metrics
        self._log = log
        self._fp = failpoints
        self.links: list[EngineLink] = []
        self.model = cfg.model_name or "?"
        self.fp = ""
        self._last_ok_sent: dict[int, float] = {}  # rank -> send time of its newest answered ping
        self.observers: list[Callable[[int, Reply], None]] = []
        # Ranks whose READs could not be confirmed finished (FenceError): no verdict may be given on them, not even
        # `abort` at shutdown; only this process's exit ends those READs.
        self.unfenced: set[int] = set()

    # -------------------------------------------------------------- connect
    async def connect(self, ctx: zmq.asyncio.Context) -> list[Manifest]:
        cfg = self.cfg
        first = self._link(ctx, 0)
        self.links = [first]
        self._log.info("waiting for engine rank 0 at %s (session %s)", first.address, self.session[:8])
        r0 = await first.wait_until_up(cfg.engine_connect_timeout)
        assert r0.manifest is not None
        tp = cfg.tp_size or r0.manifest.tp_size
        if tp != r0.manifest.tp_size:
            raise FatalError(f"MX_TP_SIZE={cfg.tp_size} but the engine reports tp_size {r0.manifest.tp_size}")
        self.links += [self._link(ctx, r) for r in range(1, tp)]
        rest = await asyncio.gather(*(lk.wait_until_up(cfg.engine_connect_timeout) for lk in self.links[1:]))
        manifests = [r.manifest for r in (r0, *rest) if r.manifest is not None]
        for r, m in enumerate(manifests):
            if m.tp_rank != r or m.tp_size != tp or m.model_id != manifests[0].model_id:
                raise FatalError(f"socket of rank {r} answers as rank {m.tp_rank}/{m.tp_size} of {m.model_id}")
        self.fp = replica_fingerprint([m.fingerprint for m in manifests])
        self.model = cfg.model_name or manifests[0].model_id
        now = time.monotonic()
        self._last_ok_sent = {r: now for r in range(tp)}
        return manifests

    def _link(self, ctx: zmq.asyncio.Context, rank: int) -> EngineLink:
        return EngineLink(ctx, self.cfg.rank_address(rank), rank, self.cfg.max_message_bytes, self.session,
                          self._keys)

    def observe(self, fn: Callable[[int, Reply], None]) -> None:
        """`fn(rank, reply)` on every answered ping (prefetch, the source's watch)."""
        if fn not in self.observers:
            self.observers.append(fn)

    def latest_manifests(self) -> list[Manifest]:
        """Each rank's manifest as its newest reply gave it."""
        return [lk.last_reply.manifest for lk in self.links if lk.last_reply is not None
                and lk.last_reply.manifest is not None]

    # -------------------------------------------------------------- commands
    async def all(self, op: str, timeout: float, ranks: list[int] | None = None) -> list[Manifest]:
        """`op` on every rank (or those listed) under our session; a refusal or an engine failure is fatal."""
        return [r.manifest for r in await self.replies(op, timeout, ranks) if r.manifest is not None]

    async def replies(self, op: str, timeout: float, ranks: list[int] | None = None) -> list[Reply]:
        """`all`, returning each rank's whole reply (with its manifest)."""
        async def one(link: EngineLink) -> Reply:
            try:
                reply = await link.request(op, timeout)  # type: ignore[arg-type]
            except EngineError as e:
                self._m.engine_errors.labels(self.model, str(link.rank), op).inc()
                raise FatalError(str(e)) from e
            assert reply.manifest is not None
            return reply

        links = self.links if ranks is None else [self.links[r] for r in ranks]
        return list(await asyncio.gather(*(one(lk) for lk in links)))

    async def states(self) -> list[Reply]:
        try:
            return list(await asyncio.gather(*(self._ping(lk) for lk in self.links)))
        except EngineError as e:
            raise FatalError(str(e)) from e

    def heard(self) -> list[EngineLink]:
        """The ranks that ever answered this session: only they can hold state of ours."""
        return [lk for lk in self.links if lk.last_reply is not None]

    async def try_all(self, op: str, timeout: float) -> bool:
        """Best effort (shutdown), to the ranks that answered: True when each of them accepted `op`. A rank that
        never answered got no request but pings (connect waits for every rank first) and is not waited for:
        measured, every stop of a sidecar whose engine never came up waited the whole `timeout` for it."""
        with contextlib.suppress(EngineError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(lk.request(op, timeout) for lk in self.heard())),  # type: ignore
                                   timeout + 1)
            return True
        return False

    async def _ping(self, link: EngineLink) -> Reply:
        sent = time.monotonic()
        reply = await link.request("ping", self.cfg.request_timeout)
        self._last_ok_sent[link.rank] = sent
        for obs in list(self.observers):
            obs(link.rank, reply)
        return reply

    # -------------------------------------------------------------- liveness, both ways
    def ping_interval(self) -> float:
        # The hook takes a rank from a session silent for MX_SIDECAR_TIMEOUT; ping well inside that.
        return min(self.cfg.heartbeat_interval, self.cfg.sidecar_timeout / 4)

    async def keepalive(self) -> None:
        """Ping every rank; three failures in a row: the engine is gone (EngineGone ends the process)."""
        failures = 0
        while True:
            await asyncio.sleep(self.ping_interval())
            self._fp.hit("task.keepalive")
            try:
                await asyncio.gather(*(self._ping(lk) for lk in self.links))
                failures = 0
            except EngineError as e:
                failures += 1
                self._log.warning("engine ping failed (%d/%d): %s", failures, ENGINE_PING_FAILURES, e)
                if failures >= ENGINE_PING_FAILURES:
                    raise EngineGone("engine is gone") from e

    def write_guard(self, rank: int) -> Callable[[], str]:
        """'' while this session may write `rank`, else why not. Asked before every READ into engine memory."""
        link = self.links[rank]

        def guard() -> str:
            if link.restarted is not None:  # the memory we would write belonged to an engine that is gone
                return str(link.restarted)
            r = link.last_reply
            if r is None:
                return f"rank {rank}: state unknown"
            if r.state != "receiving" or r.owner != self.session:
                return f"rank {rank} is {r.state} under session {r.owner[:8] or 'none'}, not ours"
            # Measured from the *send* time of the newest answered ping: the hook heard us no earlier than that.
            # A sidecar that was frozen (SIGSTOP, a long GC pause) finds its lease stale and posts nothing.
            stale = time.monotonic() - self._last_ok_sent.get(rank, 0.0)
            if stale > self.cfg.sidecar_timeout / 2:
                return f"rank {rank}: no ping answered for {stale:.1f}s; our lease on its memory is stale"
            return ""

        return guard

    async def aclose(self) -> None:
        for lk in self.links:
            await lk.aclose()
