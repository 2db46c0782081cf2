"""Property-based fuzzing of the NIXL notification channel: `decode(PeerMsg, ...)` and the `PeerRouter` in front of a
real `SourceServer`, with generated garbage and well-formed but unexpected messages (foreign sessions, wrong peers,
Hello for ranks this replica does not serve, Done/Bye without a session, oversized frames).

Whatever arrives, nothing escapes the router (an exception there would kill the NIXL notification pump), every
undecodable message is counted by the bad-message callback, a reader session only ever receives Welcome/Ready of
its own session from its own source, and the server's sessions and tasks drain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import msgpack
import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.codec import MAX_PEER_MESSAGE_BYTES, PROTOCOL_VERSION, ProtocolError, decode, encode
from sidecar.contract.messages import Bye, Done, Hello, PeerMsg, Ready, Welcome
from sidecar.metrics import Metrics
from sidecar.peers import PeerRouter
from sidecar.source.server import SourceServer
from tests.fuzz_support import budget, deep, huge_lengths, values

SESSIONS = ["s-1", "s-2", ""]
PEERS = ["source-a", "source-b", "reader-x", ""]
small_int = st.integers(-(1 << 63), (1 << 63) - 1)
text = st.one_of(st.sampled_from(SESSIONS + PEERS), st.text(max_size=50))

well_formed: st.SearchStrategy[PeerMsg] = st.one_of(
    st.builds(Hello, st.just(PROTOCOL_VERSION), text, small_int, text, text),
    st.builds(Welcome, st.just(PROTOCOL_VERSION), text, st.booleans(), text),
    st.builds(Ready, st.just(PROTOCOL_VERSION), text, small_int, small_int),
    st.builds(Done, st.just(PROTOCOL_VERSION), text, small_int),
    st.builds(Bye, st.just(PROTOCOL_VERSION), text, st.booleans()),
)


@st.composite
def peer_like(draw: st.DrawFn) -> bytes:
    """A map shaped like a peer message: any tag, version, fields of any type, extra fields."""
    msg: dict[object, object] = {}
    if draw(st.integers(0, 4)):
        msg["type"] = draw(st.one_of(st.sampled_from(["hello", "welcome", "ready", "done", "bye"]), values))
    if draw(st.integers(0, 4)):
        msg["v"] = draw(st.one_of(st.just(PROTOCOL_VERSION), small_int, values))
    for name in draw(st.lists(st.sampled_from(["session", "rank", "reader", "layout_digest", "ok", "error",
                                               "chunk", "slot", "zz"]), max_size=5)):
        msg[name] = draw(values)
    return msgpack.packb(msg)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(encode(draw(well_formed)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if draw(st.booleans()) and data:
            data[i] ^= draw(st.integers(1, 255))
        else:
            data = data[:i] + data[i + 1:] if draw(st.booleans()) else data[:i]
    return bytes(data)


oversized = st.builds(lambda m, pad: encode(msgspec.structs.replace(m, session=m.session + "x" * pad)),
                      well_formed, st.integers(MAX_PEER_MESSAGE_BYTES, MAX_PEER_MESSAGE_BYTES + 64))
garbage = st.one_of(peer_like(), mutated(), huge_lengths(), deep(), st.binary(max_size=300),
                    st.builds(msgpack.packb, values), oversized)
any_notification = st.one_of(garbage, well_formed.map(encode))


@budget(3000)
@given(data=any_notification)
@example(data=b"\x82\xa4type\xa5hello\xa2\xc3\x28\x01")  # a key that is not UTF-8
@example(data=b"\x82\xa4type\xa3bye\xa1x" + b"\x91" * 60_000 + b"\xc0")  # nesting past the recursion limit
def test_decode_peer_returns_a_message_or_raises_protocol_error_only(data):
    try:
        msg = decode(PeerMsg, data)
    except ProtocolError:
        return
    assert isinstance(msg, Hello | Welcome | Ready | Done | Bye)
    assert len(data) <= MAX_PEER_MESSAGE_BYTES and msg.v == PROTOCOL_VERSION
    assert decode(PeerMsg, encode(msg)) == msg


@budget(1000)
@given(msg=well_formed)
def test_well_formed_peer_messages_round_trip(msg):
    if not msg.session or len(msg.session) > 64:  # every peer message is bound to a session id
        with pytest.raises(ProtocolError, match="session"):
            decode(PeerMsg, encode(msg))
        return
    assert decode(PeerMsg, encode(msg)) == msg


class Channel:
    """A PeerRouter wired as the daemon wires it: source messages to a real SourceServer (no ranks, no Redis)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.metrics = Metrics()
        self.server = SourceServer(Config.from_env({}), "fuzz", None, self.metrics, Keyring(None))
        self.bad: list[str] = []
        self.router = PeerRouter(self.server.on_message, self.bad.append, Keyring(None), lambda peer, why: None)
        # Two reader sessions waiting on their sources, as pull_rank opens them.
        self.inbox = {"s-1": ("source-a", self.router.open("s-1", "source-a")),
                      "s-2": ("source-b", self.router.open("s-2", "source-b"))}

    def refused(self) -> float:
        return self.metrics.serve_sessions.labels("fuzz", "refused")._value.get()


@pytest.fixture(scope="module")
def channel() -> Iterator[Channel]:
    loop = asyncio.new_event_loop()
    ch = Channel(loop)
    yield ch
    loop.run_until_complete(ch.server.close())
    loop.close()


@budget(2500)
@given(batch=st.lists(st.tuples(st.sampled_from(PEERS), any_notification), min_size=1, max_size=8))
def test_the_router_never_raises_counts_garbage_and_delivers_only_to_the_right_session(channel, batch):
    async def feed() -> None:
        for peer, data in batch:
            channel.router(peer, data)  # an exception here would escape into the NIXL pump
        await asyncio.sleep(0)  # let Hello sessions run: no rank is served here, so each is refused
        while channel.server._tasks:
            await asyncio.gather(*channel.server._tasks, return_exceptions=True)

    bad_before, refused_before = len(channel.bad), channel.refused()
    undecodable = hellos = 0
    expected: dict[str, list[PeerMsg]] = {"s-1": [], "s-2": []}
    for peer, data in batch:
        try:
            msg = decode(PeerMsg, data)
        except ProtocolError:
            undecodable += 1
            continue
        # A Bye from the source of a session we read in goes to that session too (the source withdrew).
        if isinstance(msg, Welcome | Ready | Bye) and msg.session in expected and channel.inbox[msg.session][0] == peer:
            expected[msg.session].append(msg)
        if isinstance(msg, Hello):
            hellos += 1
    channel.loop.run_until_complete(feed())
    assert len(channel.bad) - bad_before == undecodable
    assert all(isinstance(why, str) and why for why in channel.bad[bad_before:])
    for session, (_, q) in channel.inbox.items():
        got = []
        while not q.empty():
            got.append(q.get_nowait())
        assert got == expected[session]
    # Every Hello became a session that was refused (this replica serves no rank), none is left behind; duplicate
    # Hellos of a live session are ignored, so refusals never exceed Hellos.
    assert channel.refused() - refused_before <= hellos
    assert channel.server.active_sessions == 0 and not channel.server._tasks


# ------------------------------------------------------------------------------------------------ through real NIXL


class NixlChannel:
    """The daemon's wiring end to end: a real Transport (NIXL agent, event-loop pump) whose notifications feed a
    PeerRouter and a SourceServer; an intruder agent in this process sends the generated notifications."""

    def __init__(self) -> None:
        from sidecar.transport import Transport

        self.loop = asyncio.new_event_loop()
        self.metrics = Metrics()
        self.server = SourceServer(Config.from_env({}), "fuzz", None, self.metrics, Keyring(None))
        self.bad: list[str] = []
        self.seen = 0
        router = PeerRouter(self.server.on_message, self.bad.append, Keyring(None), lambda peer, why: None)

        def on_notif(peer: str, data: bytes) -> None:
            self.seen += 1
            router(peer, data)

        self.victim = Transport("fuzz-victim", "DRAM", 0)
        self.intruder = Transport("fuzz-intruder", "DRAM", 0)
        self.peer = self.intruder.add_peer(self.victim.metadata(), "fuzz-victim")

        async def start() -> None:
            self.victim.start(on_notif)

        self.loop.run_until_complete(start())

    def close(self) -> None:
        async def stop() -> None:
            self.victim.close()
            await self.server.close()

        self.loop.run_until_complete(stop())
        self.intruder.close()
        self.loop.close()


@pytest.fixture(scope="module")
def nixl_channel() -> Iterator[NixlChannel]:
    ch = NixlChannel()
    yield ch
    ch.close()


@budget(300)
@given(batch=st.lists(any_notification.filter(lambda d: 0 < len(d) <= 4096), min_size=1, max_size=20))
def test_garbage_sent_through_real_nixl_is_counted_and_the_notification_pump_survives(nixl_channel, batch):
    ch = nixl_channel
    seen, bad = ch.seen, len(ch.bad)
    undecodable = 0
    for data in batch:
        try:
            decode(PeerMsg, data)
        except ProtocolError:
            undecodable += 1
        ch.intruder.send(ch.peer, data)

    async def drain() -> None:
        deadline = time.monotonic() + 20
        while ch.seen < seen + len(batch) and time.monotonic() < deadline:
            ch.intruder.agent.get_new_notifs()  # no progress thread: this drives the intruder's sends
            await asyncio.sleep(0.002)
        while ch.server._tasks:
            await asyncio.gather(*ch.server._tasks, return_exceptions=True)

    ch.loop.run_until_complete(drain())
    assert ch.seen == seen + len(batch), "every notification arrived"
    assert len(ch.bad) - bad == undecodable
    assert ch.victim._pump is not None and not ch.victim._pump.done(), "the notification pump is alive"
