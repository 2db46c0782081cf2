"""The hook<->sidecar session: who may change an engine rank, and when its sidecar counts as gone.

One state machine, the table TRANSITIONS, used by the runtime hook (which enforces it) and the sidecar (which reads
it in every ping reply). Each sidecar process picks a random session id; engine-changing commands carry it.

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
from typing import Literal, NamedTuple, get_args

from sidecar.contract.messages import Op, State

# Who may run an op: "claim" any session, which then owns the rank; "owner" only the session that owns it;
# "owner_or_gone" the owner, or anyone when the rank has no owner or its owner is gone (silent past the timeout).
Who = Literal["claim", "owner", "owner_or_gone"]


class Rule(NamedTuple):
    during: State  # the state while the op runs
    after: State  # the state once it succeeded (a failure leaves FAILED)
    who: Who


# The engine-changing ops: (state, op) -> rule. A pair not listed is refused ("<op> in state <state>").
TRANSITIONS: dict[tuple[State, Op], Rule] = {
    ("waiting", "prepare_target"): Rule("preparing", "receiving", "claim"),
    ("waiting", "load_from_storage"): Rule("loading", "ready", "claim"),
    ("receiving", "load_from_storage"): Rule("loading", "ready", "owner"),  # the owner's fallback
    # the received bytes are verified: re-derive host-side state from them (still writable until the verdict)
    ("receiving", "derive"): Rule("receiving", "receiving", "owner"),
    ("receiving", "weights_ready"): Rule("receiving", "ready", "owner"),
    ("waiting", "abort"): Rule("waiting", "waiting", "owner_or_gone"),
    ("receiving", "abort"): Rule("receiving", "waiting", "owner_or_gone"),  # whatever landed is void
}
FAILED: State = "failed"
READ_OPS: tuple[Op, ...] = ("ping", "describe")  # never refused, change nothing
ENGINE_OPS: tuple[Op, ...] = tuple(dict.fromkeys(op for _, op in TRANSITIONS))
# The state an op leaves on success, whatever state it started from.
AFTER: dict[Op, State] = {op: rule.after for (_, op), rule in TRANSITIONS.items()}
# States in which a session may be writing the rank's memory: from the start of its prepare_target until the target
# is released or aborted. Nobody else may touch it, and the hook never loads from storage on its own there.
WRITABLE: tuple[State, ...] = TRANSITIONS[("waiting", "prepare_target")][:2]
# Refusals of an op from a session that does not own the rank, for the ops that say so.
_FOREIGN = {
    "load_from_storage": "load_from_storage in state {state} owned by another session",
    "weights_ready": "weights_ready from a session that did not prepare this target",
    "derive": "derive from a session that did not prepare this target",
}


def _check_table() -> None:
    """The Op and State literals of sidecar.contract.messages are exactly what the table uses."""
    if set(get_args(Op)) != {*READ_OPS, *ENGINE_OPS} or set(READ_OPS) & set(ENGINE_OPS):
        raise AssertionError(f"Op {get_args(Op)} does not match the session table {READ_OPS + ENGINE_OPS}")
    states = {FAILED} | {s for s, _ in TRANSITIONS} | {s for r in TRANSITIONS.values() for s in r[:2]}
    if states != set(get_args(State)):
        raise AssertionError(f"State {get_args(State)} does not match the session table {sorted(states)}")
    if any(AFTER[op] != rule.after for (_, op), rule in TRANSITIONS.items()):
        raise AssertionError("an op must leave the same state whatever state it started from")


_check_table()


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
        st, foreign = self.state, self.owner != session
        rule = TRANSITIONS.get((st, op))
        if rule is None:
            if op == "load_from_storage" and foreign:  # says whose rank it is, whatever the state
                return _FOREIGN[op].format(state=st)
            return f"{op} in state {st}"
        if rule.who == "owner" and foreign:
            return _FOREIGN[op].format(state=st)
        if rule.who == "owner_or_gone" and self.owner and foreign and not self.owner_gone():
            return f"{op}: the rank belongs to a live session (silent {self.silent_for():.1f}s of {self.timeout:.0f}s)"
        return ""

    def begin(self, op: str, session: str) -> None:
        """Called when an accepted command starts on the engine thread."""
        rule = TRANSITIONS.get((self.state, op)) if op in ENGINE_OPS else None
        if rule is not None:
            if rule.who == "claim":
                self.owner = session
            self.state = rule.during
        self._busy += 1

    def end(self, op: str, ok: bool) -> None:
        """Called when the command finished; the owner's liveness clock restarts now."""
        self._busy -= 1
        self._last_contact = time.monotonic()
        if not ok:
            self.state = FAILED
            return
        if op not in ENGINE_OPS:
            return
        after = self.state = AFTER[op]
        if after == "receiving":  # post-processing ran: prepare_target is then idempotent
            self.prepared = True
        if after not in WRITABLE:  # released or aborted: the rank is free again, its post-processing done
            self.owner = ""

    def may_self_load(self) -> bool:
        """Load from storage without a sidecar: only when no session can be writing this memory."""
        return self.state == "waiting" and not self.owner and self.silent_for() >= self.timeout

    def self_load(self) -> None:
        self.state = TRANSITIONS[("waiting", "load_from_storage")].during

    def loaded(self) -> None:
        self.state = AFTER["load_from_storage"]
        self._last_contact = time.monotonic()

    def weights_changed(self) -> None:
        """The engine rewrote its weights in place: a source serving them must withdraw."""
        self.weights_version += 1
