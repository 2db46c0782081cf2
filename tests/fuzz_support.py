"""Hypothesis budgets and shared strategies for tests/test_fuzz_*.py. Budgets are chosen by HYPOTHESIS_PROFILE:

quick (default, `make test`): derandomized (the same cases every run, no example database), >= 10,000 cases in all;
fuzz (`make fuzz`): 20x as many, random, failures kept in .hypothesis/ for replay.
"""

from __future__ import annotations

import os

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from sidecar.contract.messages import OPS

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "quick")
SCALE = {"quick": 1, "fuzz": 20}[PROFILE]

_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                                        HealthCheck.filter_too_much], "print_blob": True}
settings.register_profile("quick", derandomize=True, database=None, **_common)
settings.register_profile("fuzz", **_common)


def budget(quick_examples: int) -> settings:
    """Settings for one fuzz test: `quick_examples` cases under the quick profile, SCALE times that otherwise."""
    return settings(settings.get_profile(PROFILE), max_examples=quick_examples * SCALE)


# ----------------------------------------------------------------------------------------------- shared strategies
MAX_FRAME = 1 << 20  # what the fuzzed sockets accept; generated frames stay below it

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(allow_nan=True),
                    st.text(max_size=40), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                      max_leaves=20)



def _huge_header(kind: str) -> bytes:
    marker = {"str": b"\xdb", "bin": b"\xc6", "array": b"\xdd", "map": b"\xdf", "ext": b"\xc9"}[kind]
    return marker + b"\xff\xff\xff\xf0"


@st.composite
def huge_lengths(draw: st.DrawFn) -> bytes:
    """A length header claiming ~4 GiB with a short body, at the top or as a field's value."""
    header = _huge_header(draw(st.sampled_from(["str", "bin", "array", "map", "ext"])))
    body = draw(st.binary(max_size=16))
    if draw(st.booleans()):
        return header + body
    field = draw(st.sampled_from(["v", "id", "op", "zz"]))
    return b"\x83" + msgpack.packb("v") + b"\x01" + msgpack.packb("id") + b"\x07" + msgpack.packb(field) + header + body


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    """Nesting deeper than any decoder's recursion limit, at the top or in a field the decoder skips."""
    depth = draw(st.integers(1, 200_000))
    nested = draw(st.sampled_from([b"\x91", b"\x81\xa1k"])) * depth + b"\xc0"
    if draw(st.booleans()):
        return nested[:MAX_FRAME]
    return (b"\x84" + msgpack.packb("v") + b"\x01" + msgpack.packb("id") + b"\x07" + msgpack.packb("op")
            + msgpack.packb(draw(st.sampled_from(OPS))) + msgpack.packb("x") + nested)[:MAX_FRAME]
