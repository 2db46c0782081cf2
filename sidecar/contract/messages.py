"""Messages between the runtime hook (engine process) and the sidecar, and between sidecars.

Everything that crosses a process boundary is msgpack with an explicit, versioned schema (msgspec
Structs), decoded by sidecar.contract.codec.decode: unknown ops, wrong types, missing fields, oversized
frames and other protocol versions are rejected with a ProtocolError that names the problem. No pickle.
Bounds msgspec can check live in the Structs (msgspec.Meta); rules across fields are the validate_*
functions below, which the codec runs on every decoded Reply and SourceRecord.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal, get_args

import msgspec

from sidecar.contract.codec import PROTOCOL_VERSION, ProtocolError, encode
from sidecar.settings import MAX_SLOT_BYTES, MAX_SLOTS, MIN_SLOT_BYTES  # also the MX_STAGING_* bounds

MAX_TENSORS = 200_000
MAX_HANDLES = 200_000
MAX_NAME_CHARS = 1024
# Bounds on what Redis and peers say, checked by the decoder before it allocates (msgspec checks a list's length
# from its header). A staging slot below MIN_SLOT_BYTES would make a transfer millions of round trips.
MAX_DIMS = 64
MAX_RANKS = 1024
MAX_IDENTITY_FIELDS = 512  # fields of a fingerprint's description (identity fields, VLLM_* settings, ...)
MAX_DERIVED = 100_000  # numbers an engine derived from its weights (runtime_hooks.derived_state), per rank
MAX_CHUNKS_PER_RANK = 1 << 20  # a plan longer than this is refused (256 TiB of 256 MiB slots, 64 GiB of 64 KiB)

_Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
_Short = Annotated[str, msgspec.Meta(max_length=256)]
_Slot = tuple[Annotated[int, msgspec.Meta(ge=0)], Annotated[int, msgspec.Meta(ge=MIN_SLOT_BYTES, le=MAX_SLOT_BYTES)]]

# Commands to the hook; sidecar/contract/session.py holds which may run in which state (checked against Op there).
Op = Literal["ping", "describe", "prepare_target", "load_from_storage", "derive", "weights_ready", "abort"]
OPS: tuple[str, ...] = get_args(Op)

# Hook states, in the order a healthy replica walks them (sidecar/contract/session.py holds the rules).
#   waiting   : tensors allocated, no verdict yet (the engine is blocked); no session may write them
#   preparing : a session's prepare_target runs (dummy init + post-processing)
#   loading   : reading weights from storage (source, or fallback)
#   receiving : final layout exposed; the owning session may write it (target)
#   ready     : the engine runs on these tensors; they may be served to others
#   failed    : the adapter raised; the reply's error says why
State = Literal["waiting", "preparing", "loading", "receiving", "ready", "failed"]


class ShmHandle(msgspec.Struct, tag="shm", frozen=True):
    """A POSIX shared memory file under /dev/shm: `nbytes` of data start `offset` bytes into it."""

    name: _Short
    offset: int
    nbytes: int


class CudaIpcHandle(msgspec.Struct, tag="cuda_ipc", frozen=True):
    """One cudaMalloc allocation segment exported with cudaIpcGetMemHandle.

    `device_uuid` (not the index: containers number GPUs differently) selects the GPU to open it on;
    `nbytes` is the part of the segment that tensors use, counted from the segment base.
    """

    device_uuid: _Short
    handle: Annotated[bytes, msgspec.Meta(max_length=256)]
    nbytes: int


Handle = ShmHandle | CudaIpcHandle


class TensorEntry(msgspec.Struct, array_like=True, frozen=True):
    """A tensor's bytes: `nbytes` starting `offset` bytes into handle `handle` (-1 for zero bytes)."""

    name: _Name
    dtype: _Short
    shape: Annotated[list[int], msgspec.Meta(max_length=MAX_DIMS)]
    handle: int
    offset: int
    nbytes: int


class Manifest(msgspec.Struct, frozen=True):
    """What one engine rank exposes.

    `fingerprint` identifies the model build (identity + pre-load layout + protocol version): replicas
    with equal fingerprints may copy from each other. `layout_digest` covers the final tensors (names,
    dtypes, shapes, sizes); it is empty until the tensors are exposed and must match byte-for-byte
    between source and target before a single byte moves.
    """

    model_id: str
    revision: str
    fingerprint: str
    tp_rank: int
    tp_size: int
    memory_kind: Literal["shm", "cuda_ipc"]
    exposed: bool
    layout_digest: str = ""
    handles: Annotated[list[Handle], msgspec.Meta(max_length=MAX_HANDLES)] = []
    tensors: Annotated[list[TensorEntry], msgspec.Meta(max_length=MAX_TENSORS)] = []
    # what the fingerprint was computed from, readable (runtime_hooks.exposure.describe_fingerprint)
    identity: Annotated[dict[_Short, _Name], msgspec.Meta(max_length=MAX_IDENTITY_FIELDS)] = {}

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    id: int
    op: Op
    session: str = ""  # the sidecar process's session; engine-changing ops need the one that owns the rank
    mac: bytes = b""  # HMAC with the deployment key (sidecar.contract.auth), required by a hook that has a key


class Reply(msgspec.Struct, frozen=True):
    v: int
    id: int
    ok: bool
    state: State | Literal["unknown"] = "unknown"
    error: str = ""
    manifest: Manifest | None = None
    owner: str = ""  # session that owns the rank ("" none)
    owner_silent_s: float = 0.0  # seconds since the owner's last contact, counted from the end of its last command
    prepared: bool = False  # post-processing ran: prepare_target is then idempotent
    weights_version: int = 0  # bumped by the engine when it changes its weights in place
    # The numbers the engine derived from its weights (runtime_hooks.derived_state), once they are final: after a
    # load, or after `derive` re-derived them from received bytes. Empty before.
    derived: Annotated[dict[_Name, _Short], msgspec.Meta(max_length=MAX_DERIVED)] = {}
    # Random per engine process (RankHook): a new value on a socket means the engine restarted under us.
    incarnation: _Short = ""


def validate_reply(reply: Reply) -> None:
    if reply.manifest is not None:
        validate_manifest(reply.manifest)


def validate_manifest(m: Manifest) -> None:
    """Structural checks that make every byte range in the manifest safe to use."""
    if not (0 <= m.tp_rank < m.tp_size):
        raise ProtocolError(f"tp_rank {m.tp_rank} outside tp_size {m.tp_size}")
    if len(m.tensors) > MAX_TENSORS or len(m.handles) > MAX_HANDLES:
        raise ProtocolError("manifest lists too many tensors or handles")
    if m.exposed and not m.layout_digest:
        raise ProtocolError("exposed manifest without a layout digest")
    names: set[str] = set()
    for t in m.tensors:
        if not t.name or len(t.name) > MAX_NAME_CHARS or t.name in names:
            raise ProtocolError(f"bad or duplicate tensor name {t.name[:80]!r}")
        names.add(t.name)
        if t.nbytes < 0 or t.offset < 0 or any(d < 0 for d in t.shape):
            raise ProtocolError(f"negative size in tensor {t.name!r}")
        if t.nbytes == 0:
            continue
        if not (0 <= t.handle < len(m.handles)):
            raise ProtocolError(f"tensor {t.name!r} names handle {t.handle} of {len(m.handles)}")
        h = m.handles[t.handle]
        if t.offset + t.nbytes > h.nbytes:
            raise ProtocolError(
                f"tensor {t.name!r} [{t.offset}, {t.offset + t.nbytes}) lies outside its handle of {h.nbytes} bytes"
            )
    if m.exposed and layout_digest(m.tensors) != m.layout_digest:
        raise ProtocolError("layout digest does not match the tensors listed")


def layout_digest(tensors: list[TensorEntry]) -> str:
    """Digest of the logical layout (names, dtypes, shapes, sizes), independent of where bytes live."""
    h = hashlib.sha256(f"mx-layout/{PROTOCOL_VERSION}".encode())
    for t in sorted(tensors, key=lambda t: t.name):
        h.update(encode([t.name, t.dtype, t.shape, t.nbytes]))
    return h.hexdigest()


def fingerprint(identity: dict[str, str | int], layout: list[tuple[str, str, list[int]]]) -> str:
    """Fingerprint of a rank: every identity field plus names/dtypes/shapes, fail-closed on any change."""
    h = hashlib.sha256(f"mx-fingerprint/{PROTOCOL_VERSION}".encode())
    h.update(encode(sorted(identity.items())))
    for name, dtype, shape in sorted(layout):
        h.update(encode([name, dtype, list(shape)]))
    return h.hexdigest()


def replica_fingerprint(rank_fingerprints: list[str]) -> str:
    """A replica may copy from another only if every rank's fingerprint matches, rank for rank."""
    h = hashlib.sha256(b"mx-replica")
    for f in rank_fingerprints:
        h.update(f.encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------- sidecar <-> sidecar
# Control messages ride NIXL notifications (at most codec.MAX_PEER_MESSAGE_BYTES); bulk bytes ride NIXL READs.
MAX_HELLO_AGE_S = 60.0
MAX_SESSION_CHARS = 64
# Every peer message is bound to a session id: a fresh random one per attempt.
_Session = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SESSION_CHARS)]


class Hello(msgspec.Struct, tag="hello", frozen=True, forbid_unknown_fields=True):
    v: int
    session: _Session  # fresh random id per attempt: every later message of the session is bound to it
    rank: int
    reader: str  # the reader's agent name; its metadata is in Redis
    layout_digest: str
    ts: float = 0.0  # reader's wall clock: a source refuses a Hello older than MAX_HELLO_AGE_S (replay)
    mac: bytes = b""


class Welcome(msgspec.Struct, tag="welcome", frozen=True, forbid_unknown_fields=True):
    v: int
    session: _Session
    ok: bool
    error: str = ""
    mac: bytes = b""


class Ready(msgspec.Struct, tag="ready", frozen=True, forbid_unknown_fields=True):
    v: int
    session: _Session
    chunk: int
    slot: int
    mac: bytes = b""


class Done(msgspec.Struct, tag="done", frozen=True, forbid_unknown_fields=True):
    v: int
    session: _Session
    chunk: int
    mac: bytes = b""


class Bye(msgspec.Struct, tag="bye", frozen=True, forbid_unknown_fields=True):
    v: int
    session: _Session
    ok: bool
    mac: bytes = b""


PeerMsg = Hello | Welcome | Ready | Done | Bye


# ---------------------------------------------------------------------------- Redis records


class RankSource(msgspec.Struct, frozen=True):
    """How to read one rank of a source. Written once per publication, never per heartbeat."""

    rank: int
    agent: str
    mem_type: str
    device_id: int
    mode: Literal["direct", "staged"]
    entries: Annotated[list[TensorEntry], msgspec.Meta(max_length=MAX_TENSORS)]
    # aligned with entries; empty when the source did not compute them
    checksums: Annotated[list[_Short], msgspec.Meta(max_length=MAX_TENSORS)]
    # staged: (addr, nbytes) of each staging slot, MIN_SLOT_BYTES..MAX_SLOT_BYTES each
    slots: Annotated[list[_Slot], msgspec.Meta(max_length=MAX_SLOTS)] = []
    # direct: absolute address of each entry in the source process
    entry_addrs: Annotated[list[int], msgspec.Meta(max_length=MAX_TENSORS)] = []
    # what the source's engine derived from these weights (Reply.derived): a target's must be equal before release
    derived: Annotated[dict[_Name, _Short], msgspec.Meta(max_length=MAX_DERIVED)] = {}


class SourceRecord(msgspec.Struct, frozen=True):
    v: int
    replica: str
    node: str
    model: str
    fingerprint: str
    ranks: Annotated[list[RankSource], msgspec.Meta(max_length=MAX_RANKS)]
    published_at: float = 0.0  # wall clock of the publication (inside the seal: a replay shows its age)
    # rank 0's fingerprint description (Manifest.identity): why another replica of the model does not match
    identity: Annotated[dict[_Short, _Name], msgspec.Meta(max_length=MAX_IDENTITY_FIELDS)] = {}
    topology: Annotated[str, msgspec.Meta(max_length=200)] = ""  # MX_TOPOLOGY: only orders a target's choice


class Sealed(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A Redis value: `body` (msgpack) with an HMAC over (kind, key, body) made with the deployment key.

    The key name is inside the MAC, so a sealed value moved to another key (another replica, another
    fingerprint, another agent) fails verification like a forged one.
    """

    v: int
    kind: str
    body: bytes
    mac: bytes = b""


def validate_record(rec: SourceRecord) -> None:
    """Rules across a record's fields (the record inside a Sealed value's body, whose seal
    sidecar.contract.auth checks first); counts and sizes are bounded by the schema."""
    for r in rec.ranks:
        if r.checksums and len(r.checksums) != len(r.entries):
            raise ProtocolError("checksum list does not match the entries")
        if r.mode == "direct" and len(r.entry_addrs) != len(r.entries):
            raise ProtocolError("direct source without one address per entry")
        if r.mode == "staged" and not r.slots:
            raise ProtocolError("staged source without slots")
        if len(r.checksums) != len(r.entries):
            raise ProtocolError("a source record must carry one checksum per entry")
        if any(a == 0 for a, _ in r.slots):
            raise ProtocolError("a staging slot at address 0")
