"""The hook<->sidecar session: who may change an engine rank, and when its sidecar counts as gone.

One state machine, used by the runtime hook (which enforces it) and the sidecar (which reads it in
every ping reply). Each sidecar process picks a random session id; engine-changing commands carry it.

Rules, each from a measured or reviewed failure:
- A target belongs to the session that prepared it: `weights_ready`, a fallback `load_from_storage`
  and `abort` from any other session are refused. (A stranger on the socket released a waiting engine.)
- Liveness is judged from the *end* of the owner's last command or its last ping, never from a
  request's receipt, and the clock stands still while one of its commands runs. (A `prepare_target`
  longer than MX_SIDECAR_TIMEOUT made the hook load from storage while the sidecar began writing.)
- The hook loads from storage on its own only when no session may write its memory: never in
  `preparing`/`receiving`. A session that went silent there may still have READs in flight; a new
  sidecar takes the rank over once the old owner has been silent for the whole timeout (in a pod a
  new sidecar process means the old one's container was restarted, its transfers ended with it).
- `prepare_target` is idempotent: post-processing (not idempotent in vLLM) runs once per engine life.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from sidecar.contract.messages import State

ENGINE_OPS = ("prepare_target", "load_from_storage", "weights_ready", "abort")
# States in which a session may be writing the rank's memory: nobody else may touch it.
WRITABLE = ("preparing", "receiving")


def new_session_id() -> str:
    return secrets.token_hex(16)


@dataclass
class RankSession:
    """The hook's view of who owns a rank. Not thread-safe: the hook holds its lock around every call."""

    timeout: float
    state: State = "waiting"
    owner: str = ""
    prepared: bool = False
    weights_version: int = 0
    _last_contact: float | None = None  # monotonic; None: no sidecar was ever heard
    _busy: int = 0  # owner commands running now: the liveness clock stands still
    _started: float = 0.0

    def __post_init__(self) -> None:
        self._started = time.monotonic()

    # -------------------------------------------------------------- liveness
    def contact(self, session: str) -> None:
        """A ping arrived. The owner's pings keep it alive; without an owner any sidecar counts."""
        if not self.owner or session == self.owner:
            self._last_contact = time.monotonic()

    def silent_for(self) -> float:
        if self._busy:
            return 0.0
        last = self._last_contact if self._last_contact is not None else self._started
        return max(0.0, time.monotonic() - last)

    @property
    def ever_contacted(self) -> bool:
        return self._last_contact is not None

    def owner_gone(self) -> bool:
        return bool(self.owner) and self.silent_for() >= self.timeout

    # -------------------------------------------------------------- commands
    def refusal(self, op: str, session: str) -> str:
        """Why `op` from `session` must be refused now ('' if it may run)."""
        if op not in ENGINE_OPS:
            return ""
        if not session:
            return f"{op} without a session"
        st, owner = self.state, self.owner
        if op == "prepare_target":
            if st != "waiting":
                return f"prepare_target in state {st}"
            return ""
        if op == "load_from_storage":
            if st == "waiting" or (st == "receiving" and owner == session):
                return ""
            return f"load_from_storage in state {st}" + (" owned by another session" if owner != session else "")
        if op == "weights_ready":
            if st != "receiving":
                return f"weights_ready in state {st}"
            return "" if owner == session else "weights_ready from a session that did not prepare this target"
        # abort
        if st not in ("waiting", "receiving"):
            return f"abort in state {st}"
        if not owner or owner == session or self.owner_gone():
            return ""
        return f"abort: the rank belongs to a live session (silent {self.silent_for():.1f}s of {self.timeout:.0f}s)"

    def begin(self, op: str, session: str) -> None:
        """Called when an accepted command starts on the engine thread."""
        if op in ("prepare_target", "load_from_storage"):
            self.owner = session
        self._busy += 1
        if op == "prepare_target":
            self.state = "preparing"
        elif op == "load_from_storage":
            self.state = "loading"

    def end(self, op: str, ok: bool) -> None:
        """Called when the command finished; the owner's liveness clock restarts now."""
        self._busy -= 1
        self._last_contact = time.monotonic()
        if not ok:
            self.state = "failed"
            return
        if op == "prepare_target":
            self.state, self.prepared = "receiving", True
        elif op in ("load_from_storage", "weights_ready"):
            self.state, self.owner = "ready", ""
        elif op == "abort":  # whatever landed is void; the rank is free again, its post-processing done
            self.state, self.owner = "waiting", ""

    def may_self_load(self) -> bool:
        """Load from storage without a sidecar: only when no session can be writing this memory."""
        return self.state == "waiting" and not self.owner and self.silent_for() >= self.timeout

    def self_load(self) -> None:
        self.state = "loading"

    def loaded(self) -> None:
        self.state = "ready"
        self._last_contact = time.monotonic()

    def weights_changed(self) -> None:
        """The engine rewrote its weights in place: a source serving them must withdraw."""
        self.weights_version += 1
