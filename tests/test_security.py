"""Attacks by a Redis writer and a pod on the network without the deployment key, through real processes.

Each of these made a target release on wrong bytes, or let a stranger drive a source, before records and
messages were authenticated (MX_AUTH_KEY_FILE). With the key they can only make a target refuse and load
from storage: slower, never wrong."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import msgspec
import pytest
import redis

from sidecar.contract.auth import AuthError, Keyring
from sidecar.contract.codec import PROTOCOL_VERSION, decode, encode
from sidecar.contract.messages import Hello, Sealed, SourceRecord
from tests.test_end_to_end import _assert_fell_back_to_storage, _metric


@pytest.fixture
def keyed(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "deployment.key"
    path.write_bytes(secrets.token_bytes(32))
    os.chmod(path, 0o600)
    return {"MX_AUTH_KEY_FILE": str(path), "MX_HEARTBEAT_INTERVAL": "5", "MX_SOURCE_TTL": "30"}


def _rewrite(url: str, pattern: str, edit) -> None:  # type: ignore[no-untyped-def]
    """A Redis writer without the key edits a sealed value's body (the old MAC stays)."""
    r = redis.Redis.from_url(url)
    key = next(iter(r.scan_iter(pattern)))
    sealed = decode(Sealed, r.get(key))
    r.set(key, encode(msgspec.structs.replace(sealed, body=edit(sealed.body))), keepttl=True)


def test_swapped_tensor_addresses_and_checksums_in_a_record_are_refused_before_any_byte_moves(replicas,
                                                                                               redis_server, keyed):
    # The measured attack: swap two same-sized tensors' source addresses and checksums (direct mode).
    a = replicas("a", extra_env={**keyed, "MX_SOURCE_MODE": "direct"})
    res_a = a.engine_results()
    a.wait_serving()

    def swap(body: bytes) -> bytes:
        rec = decode(SourceRecord, body)
        ranks = []
        for rank in rec.ranks:
            e = rank.entries
            i, j = next((i, j) for i in range(len(e)) for j in range(i + 1, len(e))
                        if e[i].nbytes == e[j].nbytes > 0 and rank.checksums[i] != rank.checksums[j])
            addrs, sums = list(rank.entry_addrs), list(rank.checksums)
            addrs[i], addrs[j], sums[i], sums[j] = addrs[j], addrs[i], sums[j], sums[i]
            ranks.append(msgspec.structs.replace(rank, entry_addrs=addrs, checksums=sums))
        return encode(msgspec.structs.replace(rec, ranks=ranks))

    _rewrite(redis_server.url, "mx:*:src:*", swap)
    b = replicas("b", extra_env=keyed)
    res_b = b.engine_results(timeout=60)
    assert res_b[0]["outcome"] == res_b[1]["outcome"] == "loaded"
    assert res_b[0]["digests"] == res_a[0]["digests"] and res_b[1]["digests"] == res_a[1]["digests"]
    _, text = b.http("/metrics")
    assert _metric(text, "mx_auth_failures_total", channel="redis", reason="bad_signature") >= 1
    assert "mx_transfer_bytes_total{" not in text
    assert _metric(text, "mx_records_authenticated") == 1


def test_a_foreign_agent_advertised_for_a_source_is_refused(replicas, redis_server, keyed):
    from sidecar.transport import Transport

    a = replicas("a", extra_env=keyed)
    res_a = a.engine_results()
    a.wait_serving()
    intruder = Transport("intruder-agent", "DRAM", 0)
    try:
        r = redis.Redis.from_url(redis_server.url)
        rec = decode(SourceRecord, decode(Sealed, r.get(next(iter(r.scan_iter("mx:*:src:*"))))).body)
        key = f"mx:agent:{rec.ranks[0].agent}"
        # Sealed with a key the intruder made up: the MAC is well-formed and wrong.
        r.set(key, Keyring(b"x" * 32).seal("agent", key, intruder.metadata()), keepttl=True)
        b = replicas("b", extra_env=keyed)
        _assert_fell_back_to_storage(b, res_a, "refused_auth")
    finally:
        intruder.close()


def test_an_unsigned_peer_message_cannot_drive_a_source_and_it_keeps_serving(replicas, redis_server, keyed):
    from sidecar.transport import Transport

    a = replicas("a", extra_env=keyed)
    res_a = a.engine_results()
    a.wait_serving()
    r = redis.Redis.from_url(redis_server.url)
    rec = decode(SourceRecord, decode(Sealed, r.get(next(iter(r.scan_iter("mx:*:src:*"))))).body)
    # The intruder got the agent metadata somehow (a leak: it is encrypted in Redis): it can talk, not drive.
    key = f"mx:agent:{rec.ranks[0].agent}"
    meta = Keyring.from_file(keyed["MX_AUTH_KEY_FILE"]).unseal("agent", key, r.get(key), 1 << 24, secret=True)
    intruder = Transport("intruder", "DRAM", 0)
    try:
        peer = intruder.add_peer(meta, rec.ranks[0].agent)
        intruder.send(peer, encode(Hello(PROTOCOL_VERSION, "s" * 32, 0, "intruder", "x", time.time())))
        forged = Hello(PROTOCOL_VERSION, "t" * 32, 0, "intruder", "x", time.time(), mac=b"\x00" * 32)
        intruder.send(peer, encode(forged))
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            intruder.agent.get_new_notifs()
            _, text = a.http("/metrics")
            if 'reason="bad_signature"' in text and 'reason="unsigned"' in text:
                break
            time.sleep(0.05)
        assert _metric(text, "mx_auth_failures_total", channel="peer", reason="unsigned") >= 1
        assert _metric(text, "mx_auth_failures_total", channel="peer", reason="bad_signature") >= 1
        assert "mx_serve_sessions_total{" not in text, "no session may start from an unauthenticated Hello"
    finally:
        intruder.close()
    b = replicas("b", extra_env=keyed)
    res_b = b.engine_results()
    assert res_b[0]["outcome"] == "received" and res_b[0]["digests"] == res_a[0]["digests"]


def test_replicas_with_different_keys_never_copy_from_each_other(replicas, tmp_path, keyed):
    a = replicas("a", extra_env=keyed)
    a.engine_results()
    a.wait_serving()
    other = tmp_path / "other.key"
    other.write_bytes(secrets.token_bytes(32))
    other.chmod(0o600)
    b = replicas("b", extra_env={**keyed, "MX_AUTH_KEY_FILE": str(other)})
    assert b.engine_results()[0]["outcome"] == "loaded"


def test_a_sealed_value_moved_to_another_key_fails_like_a_forgery():
    k = Keyring(b"q" * 32)
    blob = k.seal("record", "mx:fp:src:a", b"body")
    assert k.unseal("record", "mx:fp:src:a", blob, 1 << 20) == b"body"
    for kind, key in (("record", "mx:fp:src:b"), ("record", "mx:other:src:a")):
        with pytest.raises(AuthError):
            k.unseal(kind, key, blob, 1 << 20)
    with pytest.raises(AuthError, match="unsigned"):
        k.unseal("record", "mx:fp:src:a", Keyring(None).seal("record", "mx:fp:src:a", b"body"), 1 << 20)


def test_a_replayed_or_stale_hello_is_refused_by_the_source():
    from sidecar.config import Config
    from sidecar.metrics import Metrics
    from sidecar.source.server import SourceServer

    srv = SourceServer(Config.from_env({}), "m", None, Metrics(), Keyring(None))
    fresh = Hello(PROTOCOL_VERSION, "a" * 32, 0, "r", "d", time.time())
    assert srv._fresh_hello(fresh) == ""
    assert "replayed" in srv._fresh_hello(fresh)
    assert "old" in srv._fresh_hello(Hello(PROTOCOL_VERSION, "b" * 32, 0, "r", "d", time.time() - 3600))


def test_a_short_key_or_a_key_file_others_may_read_or_its_group_may_write_is_refused(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"x" * 8)
    short.chmod(0o600)
    with pytest.raises(ValueError, match="at least"):
        Keyring.from_file(str(short))
    key = tmp_path / "key"
    key.write_bytes(b"x" * 32)
    for mode in (0o644, 0o604, 0o666, 0o620, 0o601):  # 0644: a Kubernetes Secret volume's default mode
        key.chmod(mode)
        with pytest.raises(ValueError, match=f"mode {mode:04o}"):
            Keyring.from_file(str(key))
    for mode in (0o400, 0o440, 0o600, 0o640):  # 0440: deploy/'s defaultMode 288 with the pod's fsGroup
        key.chmod(mode)
        assert Keyring.from_file(str(key)).enabled


def test_with_a_key_a_redis_reader_cannot_load_a_sidecars_nixl_metadata(replicas, redis_server, keyed):
    # Whoever holds an agent's metadata can WRITE its registered memory (docs/SECURITY-NIXL.md): with a key it is
    # encrypted in Redis, so reading Redis no longer hands out the means to reach engine memory.
    from sidecar.transport import TransferError, Transport

    a = replicas("a", extra_env=keyed)
    a.engine_results()
    a.wait_serving()
    r = redis.Redis.from_url(redis_server.url)
    rec = decode(SourceRecord, decode(Sealed, r.get(next(iter(r.scan_iter("mx:*:src:*"))))).body)
    body = decode(Sealed, r.get(f"mx:agent:{rec.ranks[0].agent}")).body
    assert rec.ranks[0].agent.encode() not in body
    intruder = Transport("intruder", "DRAM", 0)
    try:
        with pytest.raises((TransferError, ValueError)):
            intruder.add_peer(body, rec.ranks[0].agent)
    finally:
        intruder.close()


def test_a_binary_key_keeps_its_whitespace_bytes_and_a_text_key_loses_its_newline(tmp_path):
    raw = b"\x00 " + b"k" * 30 + b" \n"  # binary (a NUL byte) with whitespace at both ends: every byte counts
    binary = tmp_path / "bin"
    binary.write_bytes(raw)
    binary.chmod(0o600)
    assert Keyring.from_file(str(binary)).mac("peer", b"x") == Keyring(raw).mac("peer", b"x")
    text = tmp_path / "txt"
    text.write_bytes(b"  " + b"k" * 34 + b" \n")  # as `openssl rand -base64` or a Secret's stringData writes it
    text.chmod(0o600)
    assert Keyring.from_file(str(text)).mac("peer", b"x") == Keyring(b"k" * 34).mac("peer", b"x")
    with pytest.raises(FileNotFoundError):
        Keyring.from_file(str(tmp_path / "missing"))
