"""The runtime hook through a real ZMQ socket, in process (the engine side alone)."""

import threading
import time

import msgpack
import pytest
import torch
import zmq

from runtime_hooks.engines.torch_module import TorchModuleAdapter
from runtime_hooks.exposure import ModelIdentity
from runtime_hooks.hook import HookError, RankHook
from sidecar.config import Config
from sidecar.contract.codec import PROTOCOL_VERSION, decode, encode
from sidecar.contract.messages import Reply, Request
from sidecar.memory.regions import ShmRegion


@pytest.fixture
def hook(tmp_path, checkpoint):
    from sidecar.lab.toy_engine import SMALL, ToyAdapter, rank_tensors

    tensors = rank_tensors(SMALL, 1, 0, torch.bfloat16)
    ident = ModelIdentity("toy", "r1", "bfloat16", 0, 1)
    h = RankHook(ToyAdapter(tensors, ident, checkpoint), f"ipc://{tmp_path}/e.sock",
                 Config.from_env({"MX_MAX_MESSAGE_BYTES": "1MiB"}))
    yield h, tensors, f"ipc://{tmp_path}/e-0.sock"
    h.close()


def _client(addr):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(addr)
    return s


def _ask(s, data):
    s.send(data)
    return decode(Reply, s.recv())


def test_malformed_oversized_and_wrong_version_messages_get_an_error_and_the_hook_keeps_serving(hook):
    _, _, addr = hook
    s = _client(addr)
    for bad, why in [(b"\xc1not msgpack", "malformed"),
                     (msgpack.packb({"v": PROTOCOL_VERSION + 1, "id": 1, "op": "ping"}), "version"),
                     (msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, "op": "rm -rf"}), "malformed"),
                     (msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, "op": "ping", "x": "y" * 900_000}), "")]:
        r = _ask(s, bad)
        assert not r.ok and why in r.error
    # A frame above ZMQ's MAXMSGSIZE drops the connection instead; a fresh one is served.
    s.send(b"\x00" * (2 << 20))
    s2 = _client(addr)
    r = _ask(s2, encode(Request(PROTOCOL_VERSION, 5, "ping")))
    assert r.ok and r.id == 5 and r.state == "waiting"


def test_describe_before_the_engine_waits_gives_the_fingerprint_but_no_memory(hook):
    h, _, addr = hook
    r = _ask(_client(addr), encode(Request(PROTOCOL_VERSION, 1, "describe")))
    assert r.manifest.fingerprint == h.fingerprint and not r.manifest.exposed and r.manifest.handles == []


def test_a_waiting_engine_offers_its_handles_but_no_layout_and_prepare_exposes_the_same_memory(hook):
    """The handles a sidecar maps ahead (memory.prefetch) are those the final manifest lists when nothing moved."""
    h, _, addr = hook
    s = _client(addr)
    ended = []

    def engine() -> None:
        with pytest.raises(HookError, match="hook closed"):  # closed below while it waits for a verdict
            h.run_until_ready(30)
        ended.append(True)

    t = threading.Thread(target=engine)
    t.start()
    deadline = time.monotonic() + 10
    r = _ask(s, encode(Request(PROTOCOL_VERSION, 1, "ping")))
    while not r.manifest.handles and time.monotonic() < deadline:  # offered once storages are in shared memory
        time.sleep(0.05)
        r = _ask(s, encode(Request(PROTOCOL_VERSION, 1, "ping")))
    assert r.state == "waiting" and not r.manifest.exposed and r.manifest.tensors == [] and r.manifest.handles
    final = _ask(s, encode(Request(PROTOCOL_VERSION, 2, "prepare_target", "s1")))
    assert final.ok and final.manifest.exposed and set(final.manifest.handles) == set(r.manifest.handles)
    _ask(s, encode(Request(PROTOCOL_VERSION, 3, "abort", "s1")))
    h.close()
    t.join(10)
    assert ended


def test_load_from_storage_exposes_shared_memory_holding_the_engines_bytes(hook):
    h, tensors, addr = hook
    s = _client(addr)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("o", h.run_until_ready(30)))
    t.start()
    r = _ask(s, encode(Request(PROTOCOL_VERSION, 2, "load_from_storage", "s1")))
    t.join(10)
    assert out["o"] == "loaded" and r.ok and r.state == "ready" and r.manifest.exposed
    by_name = {e.name: e for e in r.manifest.tensors}
    e = by_name["model.norm.weight"]
    region = ShmRegion(r.manifest.handles[e.handle])
    import ctypes

    mapped = ctypes.string_at(region.addr + e.offset, e.nbytes)
    assert mapped == tensors["model.norm.weight"].view(torch.uint8).numpy().tobytes()
    assert by_name["model.empty_scales"].nbytes == 0
    region.close()
    # Commands after the engine went on are refused, the hook keeps answering.
    r2 = _ask(s, encode(Request(PROTOCOL_VERSION, 3, "prepare_target", "s1")))
    assert not r2.ok and "prepare_target in state ready" in r2.error


def test_without_a_sidecar_the_engine_loads_from_storage_after_the_timeout(hook):
    h, tensors, _ = hook
    t0 = time.monotonic()
    assert h.run_until_ready(0.5) == "loaded_without_sidecar"
    assert time.monotonic() - t0 < 5
    assert h.state == "ready" and tensors["model.norm.weight"].abs().sum() > 0


def test_tied_weights_and_views_are_exposed_once_by_storage(tmp_path):
    emb = torch.nn.Embedding(16, 8)
    head = torch.nn.Linear(8, 16, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    from runtime_hooks.exposure import build_manifest

    tensors = TorchModuleAdapter(model, ModelIdentity("m", "r", "float32", 0, 1), tmp_path).discover_tensors()
    tensors["qkv_view"] = emb.weight.data[2:4]
    m = build_manifest(ModelIdentity("m", "r", "float32", 0, 1), "fp", tensors, expose=True)
    assert [e.name for e in m.tensors] == ["emb.weight"] and len(m.handles) == 1
    # In place: the module's parameter now lives in shared memory and still is the same object.
    assert emb.weight.untyped_storage().is_shared() and head.weight is emb.weight
