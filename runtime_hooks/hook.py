"""The runtime hook: one per engine rank, inside the engine process.

It binds the rank's ZMQ socket, answers the sidecar from a background thread, and blocks the engine
in `run_until_ready` until the sidecar's verdict: load from storage (source) or weights ready
(target). Adapter calls (load, prepare, refresh) run on the engine's own thread, never on the
socket thread (runtime_hooks.hook_server owns the socket and that thread). Nothing here imports a transfer
library: all of that lives in the sidecar.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Literal

import msgspec
import torch

from runtime_hooks.adapter import EngineAdapter
from runtime_hooks.exposure import (
    ModelIdentity,
    build_manifest,
    compute_fingerprint,
    describe_fingerprint,
    share_cpu_storages,
)
from runtime_hooks.hook_server import HookServer
from runtime_hooks.socket_guard import UnsafeSocketError
from sidecar.config import Config, rank_address
from sidecar.contract.auth import Keyring
from sidecar.contract.codec import PROTOCOL_VERSION, ProtocolError, decode
from sidecar.contract.messages import Manifest, Reply, Request, State
from sidecar.contract.session import WRITABLE, RankSession

log = logging.getLogger("mx.hook")

Outcome = Literal["received", "loaded", "loaded_without_sidecar"]

__all__ = ["EngineAdapter", "HookError", "ModelIdentity", "Outcome", "RankHook"]


class HookError(RuntimeError):
    pass


@dataclass
class _Command:
    identity: bytes
    request: Request


class RankHook:
    """Serves one rank's manifest and takes the verdict of the sidecar session that owns the rank."""

    def __init__(self, adapter: EngineAdapter, address: str | None = None, config: Config | None = None,
                 keyring: Keyring | None = None) -> None:
        self._adapter = adapter
        self._cfg = config or Config.from_env()
        self._keys = keyring or Keyring.from_file(self._cfg.auth_key_file)
        self._identity = adapter.identity()
        self.rank = self._identity.tp_rank
        self.address = rank_address(address or self._cfg.zmq_address, self.rank)
        tensors = adapter.discover_tensors()
        self._fingerprint = compute_fingerprint(self._identity, tensors)
        self._described = describe_fingerprint(self._identity, tensors)
        self._lock = threading.Lock()
        self._incarnation = secrets.token_hex(8)  # in every reply: the sidecar tells a restarted engine apart
        self._session = RankSession(self._cfg.sidecar_timeout)
        self._error = ""
        self._manifest: Manifest = build_manifest(self._identity, self._fingerprint, tensors, expose=False,
                                                 described=self._described)
        if all(t.device.type == "cuda" for t in tensors.values()):
            self._offer_provisional_handles(tensors)  # no side effect on GPU: the sidecar may map them at connect
        self._derived: dict[str, str] = {}  # final derived numbers (after a load or `derive`); {} before
        self._rederived = False  # `derive` ran for the current receive: weights_ready need not repeat it
        self._used_ids: dict[str, set[int]] = {}
        self._commands: queue.Queue[_Command | None] = queue.Queue()
        try:
            self._server = HookServer(self.address, self._cfg, self._handle, f"mx-hook-{self.rank}")
        except UnsafeSocketError as e:
            raise HookError(str(e)) from None
        self._server.start()
        log.info("rank %d: hook listening on %s (fingerprint %s, commands %s)", self.rank, self.address,
                 self._fingerprint[:12], "authenticated" if self._keys.enabled else "UNAUTHENTICATED")

    # ---------------------------------------------------------------- engine thread

    @property
    def state(self) -> State:
        return self._session.state

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def orphaned(self) -> bool:
        """True while the session that may write this rank (preparing/receiving) has been silent for the whole
        timeout: its READs may still land, and only a new sidecar can take the rank over."""
        with self._lock:
            return self._session.state in WRITABLE and self._session.owner_gone()

    def weights_changed(self) -> None:
        """Call after changing this rank's weights in place: a sidecar serving them withdraws at its next ping."""
        with self._lock:
            self._session.weights_changed()

    def run_until_ready(self, sidecar_timeout: float | None = None) -> Outcome:
        """Block the engine until its weights are final. Returns how they got there.

        Without a sidecar for `sidecar_timeout` seconds, counted from the end of the last command (also after a
        sidecar went silent before preparing), the engine loads from storage itself: slower, never wrong. It
        never does so while a session may be writing its memory (prepared target): it waits for a new sidecar.
        """
        if sidecar_timeout is not None:
            if not (sidecar_timeout > 0):
                raise HookError("sidecar_timeout must be > 0")
            with self._lock:
                self._session.timeout = sidecar_timeout
        self._preshare()
        blocked_logged = False
        while True:
            with self._lock:
                sess = self._session
                if sess.may_self_load():
                    break
                wait = max(sess.timeout - sess.silent_for(), 0.05)
                orphaned = sess.state in WRITABLE and sess.owner_gone()
            if orphaned and not blocked_logged:
                log.error("rank %d: the sidecar session that prepared this target went silent; its READs may still "
                          "land, so the engine stays blocked until a new sidecar takes over (fail closed)", self.rank)
                blocked_logged = True
            try:
                # Wakes at once on a command; otherwise exactly when the silence would reach the timeout.
                cmd = self._commands.get(timeout=wait)
            except queue.Empty:
                continue
            if cmd is None:
                raise HookError("hook closed while waiting for a verdict")
            outcome = self._execute(cmd)
            if outcome is not None:
                return outcome
        return self._load_without_sidecar()

    def _preshare(self) -> None:
        """Move CPU storages into shared memory now, while the sidecar starts up, instead of at expose time.

        Measured: ~1 s per 0.8 GB rank of 500 tensors (torch_shm_manager round trips, page faults); paid here,
        in parallel with the sidecar's NIXL agent creation, it is off a target's critical path. The tensors an
        adapter creates later (post-processing) are shared at expose time as before.
        """
        t0 = time.monotonic()
        tensors = self._adapter.discover_tensors()
        n = share_cpu_storages(tensors)
        if n:
            log.info("rank %d: %d storages moved to shared memory in %.2fs", self.rank, n, time.monotonic() - t0)
        if not self._manifest.handles and self._session.state == "waiting":
            self._offer_provisional_handles(tensors)

    def _offer_provisional_handles(self, tensors: dict[str, torch.Tensor]) -> None:
        """List the memory handles of the tensors as they stand, before any load or post-processing.

        The sidecar maps them while it decides its role and the engine prepares, so that mapping the final
        manifest afterwards mostly finds them mapped already (0.19 s for 451 handles on an H200 before). Only
        the handles are offered (`exposed` stays false, no entries): the layout is final only once exposed, and
        the sidecar locates and writes tensors through the final manifest alone.
        """
        try:
            m = build_manifest(self._identity, self._fingerprint, tensors, expose=True, described=self._described)
        except Exception as e:  # e.g. VMM memory: the final exposure reports it where it matters
            log.info("rank %d: handles are offered only once exposed (%s)", self.rank, e)
            return
        provisional = msgspec.structs.replace(self._manifest, handles=m.handles)
        with self._lock:
            if self._session.state == "waiting" and not self._manifest.exposed:
                self._manifest = provisional

    def _load_without_sidecar(self) -> Outcome:
        with self._lock:
            contacted = self._session.ever_contacted
            prepared = self._session.prepared
            self._session.self_load()
        log.warning("rank %d: %s for %.0fs; loading from storage without it", self.rank,
                    "sidecar went silent" if contacted else "no sidecar answered", self._session.timeout)
        if prepared:  # a target attempt was aborted: its memory is in the prepared layout, maybe half-written
            self._adapter.reset_for_retry()
        self._adapter.load_from_storage()
        self._expose(final=True)
        with self._lock:
            self._session.loaded()
        return "loaded_without_sidecar"

    def _execute(self, cmd: _Command) -> Outcome | None:
        op, session = cmd.request.op, cmd.request.session
        t0 = time.monotonic()
        with self._lock:
            why = self._session.refusal(op, session)  # the state may have moved since the socket thread looked
            if not why:
                prepared = self._session.prepared
                self._session.begin(op, session)
        if why:
            self._reply_error(cmd, why)
            return None
        try:
            outcome: Outcome | None = None
            if op == "prepare_target":
                if prepared:
                    log.info("rank %d: target already post-processed by an earlier session; not repeating it",
                             self.rank)
                else:
                    self._adapter.prepare_target()
                self._expose(final=False)
            elif op == "load_from_storage":
                if prepared:
                    self._adapter.reset_for_retry()
                self._adapter.load_from_storage()
                self._expose(final=True)
                outcome = "loaded"
            elif op == "derive":  # verified bytes are in place: re-derive from them, report, wait for the verdict
                self._rederive()
            elif op == "weights_ready":
                if not self._rederived:
                    self._rederive()
                outcome = "received"
        except Exception as e:  # the engine's own failure: report it to the sidecar, then raise in the engine
            log.exception("rank %d: %s failed", self.rank, op)
            with self._lock:
                self._session.end(op, ok=False)
                self._error = f"{op} failed: {e}"
            self._reply_error(cmd, self._error)
            raise HookError(self._error) from e
        with self._lock:
            self._session.end(op, ok=True)
        self._reply_ok(cmd)
        log.info("rank %d: %s done in %.2fs (session %s)", self.rank, op, time.monotonic() - t0, session[:8])
        return outcome

    def _expose(self, final: bool) -> None:
        """Publish the layout; with `final` (real weights) also the numbers derived from them."""
        manifest = build_manifest(self._identity, self._fingerprint, self._adapter.discover_tensors(), expose=True,
                                  described=self._described)
        derived = self._adapter.derived_state() if final else {}
        with self._lock:
            self._manifest = manifest
            self._derived = derived
            self._rederived = False

    def _rederive(self) -> None:
        self._adapter.after_receive()
        derived = self._adapter.derived_state()
        with self._lock:
            self._derived = derived
            self._rederived = True

    def _post(self, ident: bytes, reply: Reply) -> None:
        self._server.post(ident, reply)

    def _reply_ok(self, cmd: _Command) -> None:
        self._post(cmd.identity, self._make_reply(cmd.request.id, True))

    def _reply_error(self, cmd: _Command, error: str) -> None:
        self._post(cmd.identity, self._make_reply(cmd.request.id, False, error))

    def _make_reply(self, req_id: int, ok: bool, error: str = "", with_manifest: bool = True) -> Reply:
        with self._lock:
            s = self._session
            return Reply(PROTOCOL_VERSION, req_id, ok, s.state, error or self._error,
                         self._manifest if with_manifest else None, s.owner, round(s.silent_for(), 3), s.prepared,
                         s.weights_version, self._derived if with_manifest else {}, self._incarnation)

    # ---------------------------------------------------------------- socket thread

    def _handle(self, ident: bytes, frames: list[bytes]) -> Reply | None:
        """A request, on the socket thread: the reply to send now, or None when the engine thread will answer."""
        if len(frames) != 2:
            return Reply(PROTOCOL_VERSION, 0, False, error="expected one frame")
        try:
            req = decode(Request, frames[1], self._cfg.max_message_bytes)
            self._keys.check_msg("hook", req, f"{req.op} request")
            self._check_fresh_id(req)
        except ProtocolError as e:
            log.warning("rank %d: rejected message: %s", self.rank, e)
            return Reply(PROTOCOL_VERSION, 0, False, "unknown", str(e))
        if req.op in ("ping", "describe"):
            with self._lock:
                self._session.contact(req.session)
            return self._make_reply(req.id, True)
        with self._lock:
            why = self._session.refusal(req.op, req.session)
        if why:
            return self._make_reply(req.id, False, why, with_manifest=False)
        # Queued even before the engine reaches run_until_ready; it drains them there.
        self._commands.put(_Command(ident, req))
        return None

    def _check_fresh_id(self, req: Request) -> None:
        """With a key, a recorded engine command cannot be replayed: ids are used once per session."""
        if not self._keys.enabled or req.op in ("ping", "describe"):
            return
        used = self._used_ids.setdefault(req.session, set())
        if req.id in used or len(used) > 10_000:
            raise ProtocolError(f"request id {req.id} was already used by this session (replay?)")
        used.add(req.id)

    def close(self) -> None:
        if not self._server.stop():
            return
        self._commands.put(None)
        self._server.join()
