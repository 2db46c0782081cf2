"""The wire codec: one encoder and one `decode(kind, data, max_bytes)` for everything that crosses a process boundary.

Decoding is strict: the frame's size is checked before anything is parsed, its protocol version before its
schema, then msgspec validates the schema (types, bounds from `msgspec.Meta`) and, for the kinds whose rules span
several fields, the check that sidecar.contract.messages names for that kind. Every failure is a ProtocolError
that names the problem. No pickle.

The kinds form a fixed table built on the first decode (sidecar.contract.messages imports this module for its
encoder and errors, so the table is built after both modules are loaded); callers cannot add to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import msgspec

PROTOCOL_VERSION = 4  # 2: sessions on engine commands, MACs on peer messages, sealed Redis records;
#                      3: `derive` and derived state beside the tensors (a release needs the source's numbers);
#                      4: staged passes are carousels (the first Ready may name any chunk, then wraps round),
#                         "busy:" refusals, a record's topology
# Bounds that hold whatever the config says: a manifest of 100k tensors is ~10 MiB of msgpack.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# Control messages between sidecars ride NIXL notifications: tiny, bounded, versioned.
MAX_PEER_MESSAGE_BYTES = 64 << 10

T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that must not be acted on: malformed, oversized, wrong version, unexpected."""


# What msgspec raises besides DecodeError on hostile input (found by tests/test_fuzz_*.py): RecursionError for deep
# nesting (even inside a field it skips), UnicodeDecodeError for a map key that is not UTF-8.
_DECODE_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)


class _Envelope(msgspec.Struct):
    """Only the version: read first so a peer speaking another version gets a clear error."""

    v: int


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_encoder = msgspec.msgpack.Encoder()


def encode(msg: object) -> bytes:
    return _encoder.encode(msg)


@dataclass(frozen=True)
class _Kind:
    decoder: msgspec.msgpack.Decoder[Any]
    what: str  # named in the error: "malformed <what>: ..."
    max_bytes: int  # the limit when the caller names none
    check: Callable[[Any], None] | None  # rules across fields, run on the decoded value


@functools.cache
def _kinds() -> dict[object, _Kind]:
    from sidecar.contract import messages as m

    table: tuple[tuple[object, str, int, Callable[[Any], None] | None], ...] = (
        (m.Request, "request", DEFAULT_MAX_MESSAGE_BYTES, None),
        (m.Reply, "reply", DEFAULT_MAX_MESSAGE_BYTES, m.validate_reply),
        (m.PeerMsg, "peer message", MAX_PEER_MESSAGE_BYTES, None),
        (m.Sealed, "sealed value", DEFAULT_MAX_MESSAGE_BYTES, None),
        (m.SourceRecord, "source record", DEFAULT_MAX_MESSAGE_BYTES, m.validate_record),
    )
    return {kind: _Kind(msgspec.msgpack.Decoder(kind), what, limit, check) for kind, what, limit, check in table}


@overload
def decode(kind: type[T], data: bytes, max_bytes: int | None = None) -> T: ...
@overload
def decode(kind: object, data: bytes, max_bytes: int | None = None) -> Any: ...
def decode(kind: object, data: bytes, max_bytes: int | None = None) -> Any:
    """Decode `data` as `kind` (Request, Reply, PeerMsg, Sealed, SourceRecord), at most `max_bytes` long
    (default: the kind's own limit). Raises ProtocolError naming the problem."""
    try:
        k = _kinds()[kind]
    except (KeyError, TypeError):
        raise TypeError(f"{kind!r} is not a kind the codec decodes") from None
    limit = k.max_bytes if max_bytes is None else max_bytes
    if len(data) > limit:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {limit}")
    try:
        env = _envelope_decoder.decode(data)
    except _DECODE_ERRORS as e:
        raise ProtocolError(f"malformed message: {e}") from None
    if env.v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {env.v} is not supported (this side speaks {PROTOCOL_VERSION})")
    try:
        value = k.decoder.decode(data)
    except _DECODE_ERRORS as e:  # msgspec.ValidationError is a DecodeError
        raise ProtocolError(f"malformed {k.what}: {e}") from None
    if k.check is not None:
        k.check(value)
    return value
