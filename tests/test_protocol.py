import msgpack
import msgspec
import pytest

from sidecar.contract.codec import decode
from sidecar.contract.messages import (
    PROTOCOL_VERSION,
    Hello,
    Manifest,
    PeerMsg,
    ProtocolError,
    Reply,
    Request,
    ShmHandle,
    SourceRecord,
    TensorEntry,
    encode,
    layout_digest,
    validate_manifest,
)


def _manifest(**kw):
    default = [TensorEntry("a", "float32", [4], 0, 0, 16), TensorEntry("b", "float32", [0], -1, 0, 0)]
    entries = kw.pop("entries", default)
    handles = kw.pop("handles", [ShmHandle("x", 64, 16)])
    return Manifest("m", "r", "fp", kw.pop("tp_rank", 0), kw.pop("tp_size", 1), "shm", True,
                    layout_digest(entries), handles, entries)


def test_request_round_trips_as_plain_msgpack():
    data = encode(Request(PROTOCOL_VERSION, 7, "describe"))
    assert msgpack.unpackb(data) == {"v": PROTOCOL_VERSION, "id": 7, "op": "describe", "session": "", "mac": b""}
    assert decode(Request, data).op == "describe"


@pytest.mark.parametrize("data,match", [
    (b"\xc1\xc1garbage", "malformed"),
    (msgpack.packb({"v": 99, "id": 1, "op": "ping"}), "version 99"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, "op": "format_disk"}), "malformed request"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "id": "x", "op": "ping"}), "malformed request"),
    (msgpack.packb([1, 2, 3]), "malformed"),
])
def test_malformed_and_wrong_version_requests_are_rejected_with_a_reason(data, match):
    with pytest.raises(ProtocolError, match=match):
        decode(Request, data)


def test_oversized_messages_are_rejected_before_decoding():
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(Request, b"\x00" * 1025, max_bytes=1024)


def test_pickle_is_never_accepted():
    import pickle

    with pytest.raises(ProtocolError):
        decode(Request, pickle.dumps({"v": 1, "id": 1, "op": "ping"}))


def test_a_manifest_whose_tensor_lies_outside_its_handle_is_rejected():
    bad = _manifest(entries=[TensorEntry("a", "float32", [8], 0, 0, 32)])
    with pytest.raises(ProtocolError, match="outside its handle"):
        validate_manifest(bad)
    wrong_handle = _manifest(entries=[TensorEntry("a", "float32", [4], 3, 0, 16)])
    with pytest.raises(ProtocolError, match="names handle"):
        validate_manifest(wrong_handle)


def test_a_manifest_whose_digest_does_not_match_its_tensors_is_rejected():
    m = _manifest()
    forged = msgspec.structs.replace(m, layout_digest="0" * 64)
    with pytest.raises(ProtocolError, match="digest"):
        validate_manifest(forged)


def test_replies_with_invalid_manifests_are_rejected_on_decode():
    m = _manifest(entries=[TensorEntry("a", "float32", [8], 0, 0, 32)])
    with pytest.raises(ProtocolError):
        decode(Reply, encode(Reply(PROTOCOL_VERSION, 1, True, "ready", "", m)))


def test_peer_messages_are_tagged_and_bounded():
    h = Hello(PROTOCOL_VERSION, "s", 0, "agent", "d")
    assert decode(PeerMsg, encode(h)) == h
    with pytest.raises(ProtocolError):
        decode(PeerMsg, msgpack.packb({"type": "hello", "v": 1}))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(PeerMsg, b"\x00" * (1 << 17))


def test_source_records_with_inconsistent_rank_data_are_rejected():
    from sidecar.contract.messages import RankSource

    e = [TensorEntry("a", "float32", [4], 0, 0, 16)]
    rec = SourceRecord(PROTOCOL_VERSION, "r", "n", "m", "fp", [RankSource(0, "ag", "DRAM", 0, "direct", e, [], [], [])])
    with pytest.raises(ProtocolError, match="address per entry"):
        decode(SourceRecord, encode(rec))
    staged = RankSource(0, "ag", "DRAM", 0, "staged", e, [], [], [])
    rec2 = SourceRecord(PROTOCOL_VERSION, "r", "n", "m", "fp", [staged])
    with pytest.raises(ProtocolError, match="without slots"):
        decode(SourceRecord, encode(rec2))
