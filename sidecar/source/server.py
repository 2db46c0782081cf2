"""The source side: answers readers' Hello and tracks their sessions.

A reader (target sidecar) sends Hello over a NIXL notification. The server checks the Hello is fresh
(replay protection), starts a reader session (sidecar.source.sessions) and routes the reader's Done and
Bye to it; a staged session runs the staging ring's pass (sidecar.source.ring).
"""

from __future__ import annotations

import asyncio
import logging

from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.codec import encode
from sidecar.contract.messages import Bye, Done, Hello, Ready, Welcome
from sidecar.coordinator import Coordinator
from sidecar.memory.rank_memory import RankMemory
from sidecar.metrics import Metrics
from sidecar.source.sessions import HelloGuard, ReaderSession, serve_reader
from sidecar.transport import Transport

log = logging.getLogger("mx.serving")



class SourceServer:
    def __init__(self, cfg: Config, model: str, coordinator: Coordinator | None, metrics: Metrics,
                 keys: Keyring) -> None:
        self._cfg = cfg
        self.model = model
        self._coord = coordinator
        self._m = metrics
        self._keys = keys
        self._ranks: dict[int, RankMemory] = {}
        # Each rank's agent, kept after a withdrawal: a reader whose Hello comes late is refused from the agent it
        # addressed (it ignores any other) at once, instead of waiting out MX_STALL_TIMEOUT in silence.
        self._agents: dict[int, Transport] = {}
        self._sessions: dict[tuple[str, str], ReaderSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._hellos = HelloGuard()

    def serve(self, ranks: dict[int, RankMemory]) -> None:
        self._ranks = ranks
        self._agents.update({r: rm.transport for r, rm in ranks.items() if rm.transport is not None})

    def stop_serving(self) -> None:
        """Withdrawn: refuse new readers and end the sessions in progress (their targets fall back)."""
        self._ranks = {}
        for t in list(self._tasks):
            t.cancel()

    def _fresh_hello(self, msg: Hello) -> str:
        return self._hellos.check(msg)

    def _send(self, transport: Transport, peer: str, msg: Welcome | Ready | Bye) -> None:
        transport.send(peer, encode(self._keys.sign_msg("peer", msg)))

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def on_message(self, peer: str, msg: Hello | Done | Bye) -> None:
        if isinstance(msg, Hello):
            key = (peer, msg.session)
            if key in self._sessions or len(self._sessions) >= 64:
                log.warning("ignoring duplicate or excess Hello from %s", peer)
                return
            why = self._fresh_hello(msg)
            if why:
                log.warning("[model=%s role=source peer=%s] refused Hello: %s", self.model, peer, why)
                self._m.auth_failures.labels(self.model, "peer", "replay").inc()
                return
            s = self._sessions[key] = ReaderSession(msg, peer)
            task = asyncio.get_running_loop().create_task(self._run(s))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        sess = self._sessions.get((peer, msg.session))
        if sess is None:
            return
        if isinstance(msg, Done):
            sess.on_done(msg.chunk)
        else:
            sess.bye.set()

    async def _run(self, s: ReaderSession) -> None:
        def forget() -> None:
            self._sessions.pop((s.peer, s.hello.session), None)

        await serve_reader(s, self._ranks.get(s.hello.rank), cfg=self._cfg, model=self.model, coord=self._coord,
                           metrics=self._m, send=self._send, forget=forget, agent=self._agents.get(s.hello.rank))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
