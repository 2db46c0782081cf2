"""Routes NIXL notifications between this sidecar's reader sessions and its source server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sidecar.contract.auth import AuthError, Keyring
from sidecar.contract.codec import ProtocolError, decode
from sidecar.contract.messages import Bye, Done, Hello, PeerMsg, Ready, Welcome

log = logging.getLogger("mx.peers")


class PeerRouter:
    """Welcome/Ready go to the reader session waiting for them; Hello/Done/Bye go to the source server."""

    def __init__(self, on_source_msg: Callable[[str, Hello | Done | Bye], None],
                 on_bad: Callable[[str], None], keys: Keyring, on_auth_fail: Callable[[str, str], None]) -> None:
        self._inboxes: dict[str, tuple[str, asyncio.Queue[Welcome | Ready | Bye]]] = {}
        self._on_source_msg = on_source_msg
        self._on_bad = on_bad
        self._keys = keys
        self._on_auth_fail = on_auth_fail

    def open(self, session: str, source_agent: str) -> asyncio.Queue[Welcome | Ready | Bye]:
        q: asyncio.Queue[Welcome | Ready | Bye] = asyncio.Queue()
        self._inboxes[session] = (source_agent, q)
        return q

    def close(self, session: str) -> None:
        self._inboxes.pop(session, None)

    def __call__(self, peer: str, data: bytes) -> None:
        try:
            msg: PeerMsg = decode(PeerMsg, data)
        except ProtocolError as e:
            log.warning("rejected notification from %s: %s", peer, e)
            self._on_bad(str(e))
            return
        try:
            self._keys.check_msg("peer", msg, f"{type(msg).__name__} from {peer}")
        except AuthError as e:  # an unauthenticated peer cannot drive a source or a target
            self._on_auth_fail(peer, e.reason)
            return
        entry = self._inboxes.get(msg.session)
        if isinstance(msg, Bye) and entry is not None and entry[0] == peer:
            entry[1].put_nowait(msg)  # our source withdrew from a session we read in
        elif isinstance(msg, (Welcome, Ready)):
            if entry is None or entry[0] != peer:
                log.debug("notification for a finished or foreign session %s from %s", msg.session, peer)
                return
            entry[1].put_nowait(msg)
        else:
            self._on_source_msg(peer, msg)
