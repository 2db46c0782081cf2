"""The hook<->sidecar session through a real hook on a real ZMQ socket (engine side, in process).

Each test is a race or a stranger that once could leave an engine on wrong bytes (issue: never wrong)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from runtime_hooks.exposure import ModelIdentity
from runtime_hooks.hook import RankHook
from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.codec import PROTOCOL_VERSION, decode, encode
from sidecar.contract.messages import Reply, Request
from sidecar.lab.toy_engine import SMALL, ToyAdapter, rank_tensors


class CountingAdapter(ToyAdapter):
    """A toy engine whose post-processing is slow and counted (vLLM's is not idempotent)."""

    def __init__(self, *a: object, prepare_s: float = 0.0) -> None:
        super().__init__(*a)  # type: ignore[arg-type]
        self.prepare_s = prepare_s
        self.prepared = 0
        self.loaded = 0

    def prepare_target(self) -> None:
        time.sleep(self.prepare_s)
        self.prepared += 1

    def load_from_storage(self) -> None:
        self.loaded += 1
        super().load_from_storage()


@pytest.fixture
def make_hook(tmp_path: Path, checkpoint: Path):
    made: list[RankHook] = []

    def make(timeout: float = 1.0, prepare_s: float = 0.0, key: bytes | None = None):
        tensors = rank_tensors(SMALL, 1, 0, torch.bfloat16)
        adapter = CountingAdapter(tensors, ModelIdentity("toy", "r1", "bfloat16", 0, 1), checkpoint,
                                  prepare_s=prepare_s)
        cfg = Config.from_env({"MX_SIDECAR_TIMEOUT": str(timeout)})
        h = RankHook(adapter, f"ipc://{tmp_path}/e{len(made)}.sock", cfg, Keyring(key))
        made.append(h)
        out: dict[str, object] = {}

        def run() -> None:
            try:
                out["outcome"] = h.run_until_ready()
            except Exception as e:
                out["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return h, adapter, f"ipc://{tmp_path}/e{len(made) - 1}-0.sock", out, t

    yield make
    for h in made:
        h.close()


class Client:
    def __init__(self, addr: str, session: str, key: bytes | None = None) -> None:
        self.s = zmq.Context.instance().socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.setsockopt(zmq.RCVTIMEO, 15000)
        self.s.connect(addr)
        self.session, self.keys, self.n = session, Keyring(key), 0

    def ask(self, op: str) -> Reply:
        self.n += 1
        self.s.send(encode(self.keys.sign_msg("hook", Request(PROTOCOL_VERSION, self.n, op, self.session))))  # type: ignore[arg-type]
        while True:
            r = decode(Reply, self.s.recv())
            if r.id in (self.n, 0):
                return r


def test_a_weights_ready_from_another_session_is_refused_and_the_engine_stays_blocked(make_hook):
    h, _, addr, out, _ = make_hook(timeout=30)
    owner, stranger = Client(addr, "owner"), Client(addr, "stranger")
    assert owner.ask("prepare_target").ok
    for op in ("weights_ready", "load_from_storage", "abort"):
        r = stranger.ask(op)
        assert not r.ok and r.state == "receiving", op
    assert h.state == "receiving" and not out


def test_a_prepare_target_slower_than_the_sidecar_timeout_never_starts_a_storage_load(make_hook):
    # Before: the contact clock ran from the request's receipt, the engine loaded from storage on its own after
    # the timeout, while the sidecar (its reply just in) started writing into the same memory.
    h, adapter, addr, out, _ = make_hook(timeout=0.5, prepare_s=2.0)
    c = Client(addr, "sc")
    r = c.ask("prepare_target")
    assert r.ok and r.state == "receiving" and r.owner == "sc"
    time.sleep(1.5)  # silent for three timeouts after the command ended: the rank is still ours, never self-loaded
    assert h.state == "receiving" and adapter.loaded == 0 and not out


def test_pings_during_a_long_prepare_are_answered_with_the_preparing_state(make_hook):
    _, _, addr, _, _ = make_hook(timeout=5, prepare_s=1.5)
    c, pinger = Client(addr, "sc"), Client(addr, "sc")
    c.s.send(encode(Request(PROTOCOL_VERSION, 99, "prepare_target", "sc")))
    time.sleep(0.3)
    r = pinger.ask("ping")
    assert r.ok and r.state == "preparing" and r.owner == "sc" and r.owner_silent_s == 0.0
    assert decode(Reply, c.s.recv()).state == "receiving"


def test_a_silent_owner_is_taken_over_only_after_the_timeout_and_post_processing_runs_once(make_hook):
    _h, adapter, addr, out, _ = make_hook(timeout=1.0)
    old, new = Client(addr, "old"), Client(addr, "new")
    assert old.ask("prepare_target").ok
    r = new.ask("abort")
    assert not r.ok and "live session" in r.error  # its READs could still land
    time.sleep(1.2)
    assert new.ask("abort").ok
    r = new.ask("prepare_target")
    assert r.ok and r.owner == "new" and adapter.prepared == 1
    assert old.ask("weights_ready").ok is False  # the old session lost the rank for good
    assert new.ask("weights_ready").ok
    time.sleep(0.2)
    assert out["outcome"] == "received"


def test_without_any_sidecar_the_hook_loads_from_storage_but_never_over_a_prepared_target(make_hook):
    _h, adapter, addr, out, t = make_hook(timeout=0.5)
    c = Client(addr, "sc")
    assert c.ask("prepare_target").ok
    time.sleep(1.5)
    assert not out and adapter.loaded == 0, "a silent session's READs may land: stay blocked"
    assert c.ask("abort").ok  # the session fenced its READs and gave the rank back
    t.join(5)
    assert out["outcome"] == "loaded_without_sidecar" and adapter.loaded == 1 and adapter.prepared == 1


def test_with_a_key_a_stranger_on_the_hook_socket_can_neither_drive_nor_read_the_engine(make_hook):
    key = b"k" * 32
    _h, _, addr, _out, _ = make_hook(timeout=30, key=key)
    for client in (Client(addr, "x"), Client(addr, "x", b"z" * 32)):
        for op in ("ping", "describe", "prepare_target", "load_from_storage"):
            r = client.ask(op)
            assert not r.ok and r.manifest is None and ("MAC" in r.error), (op, r.error)
    good = Client(addr, "sc", key)
    assert good.ask("prepare_target").ok
    # A recorded command cannot be replayed: its id was used.
    good.n -= 1
    r = good.ask("prepare_target")
    assert not r.ok and "already used" in r.error
