"""Fault scenarios of a burst (issue 19), randomized like the rest of tests/faults.py: the source killed while one
staging pass feeds four readers, a reader joining a pass half way, and two sources sharing a burst. Each ends with
every engine on the checkpoint's bytes or blocked, never anything else."""

from __future__ import annotations

import random
import re
import signal
import time
from collections.abc import Callable

from tests.faults import SLOW_TRANSFER, Lab, Outcome, classify, results, seed

STAGED_SLOW = {**SLOW_TRANSFER, "MX_SOURCE_MODE": "staged"}


def _worst(outs: list[Outcome], scenario: str, t0: float, note: str = "") -> Outcome:
    """One outcome for several targets: wrong if any is, blocked if any is, received only if all are."""
    kinds = {o.outcome for o in outs}
    kind = "blocked" if "blocked" in kinds else "fell_back" if "fell_back" in kinds else "received"
    return Outcome(scenario, kind, any(o.wrong for o in outs), time.monotonic() - t0,
                   note or ", ".join(o.outcome for o in outs))


def source_killed_mid_pass(lab: Lab, rng: random.Random) -> Outcome:
    """Four targets read one staging pass; the source sidecar is SIGKILLed at a random point of it. Each target falls
    to another candidate (one that finished first) or to storage; none releases on a partial pass."""
    a, ref = seed(lab, STAGED_SLOW)
    env = {**STAGED_SLOW, "MX_STALL_TIMEOUT": "3"}
    targets = [lab.start(f"tgt{i}", env, sidecar_timeout=4.0) for i in range(4)]
    for t in targets:
        t.sidecar.wait_for(r"pulling .* from", 60)  # type: ignore[union-attr]
    time.sleep(rng.uniform(0, 1.0))
    t0 = time.monotonic()
    a.sidecar.signal(signal.SIGKILL)  # type: ignore[union-attr]
    outs = []
    for t in targets:
        if results(t, 40) is None and t.sidecar.p.poll() is not None:  # type: ignore[union-attr]
            t.new_sidecar({"MX_TEST_FAILPOINTS": ""})  # exited without a verdict (a drain it could not confirm):
        outs.append(classify("source killed mid-pass with 4 readers", t, ref, t0, timeout=60))  # as Kubernetes
    for t in targets:
        lab.stop(t)
    lab.stop(a)
    return _worst(outs, "source killed mid-pass with 4 readers", t0)


def late_joiner(lab: Lab, rng: random.Random) -> Outcome:
    """A second target joins a staged pass half way: it starts on the next fill and wraps round to the chunks it
    missed; both hold the source's bytes."""
    a, ref = seed(lab, STAGED_SLOW)
    b = lab.start("early", STAGED_SLOW)
    b.sidecar.wait_for(r"pulling .* from", 60)  # type: ignore[union-attr]
    time.sleep(rng.uniform(0.2, 0.8))
    t0 = time.monotonic()
    c = lab.start("late", STAGED_SLOW)
    outs = [classify("late joiner", x, ref, t0, timeout=60) for x in (b, c)]
    out = _worst(outs, "a reader joins a pass half way", t0)
    joined = [m.group(1) for line in c.sidecar.lines  # type: ignore[union-attr]
              if (m := re.search(r"joined the source's pass at chunk (\d+)", line))]
    out.note = f"{out.note}; the late one joined at chunks {joined}"
    for x in (c, b, a):
        lab.stop(x)
    return out


def two_sources_share_a_burst(lab: Lab, rng: random.Random) -> Outcome:
    """Two sources serve; four targets start at once with room for two readers per pass: both sources serve
    (least loaded first, a busy one is left for the other), every target ends on the source's bytes."""
    env = {**STAGED_SLOW, "MX_FANOUT_READERS": "2"}
    a, ref = seed(lab, env)
    b = lab.start("src2", env)
    if classify("", b, ref, time.monotonic()).outcome != "received":
        lab.stop(b)
        lab.stop(a)
        return Outcome("two sources share a burst", "fell_back", False, 0.0, "expected the second source to receive")
    b.wait_serving(60)
    marks = {s.name: len(s.sidecar.lines) for s in (a, b)}  # type: ignore[union-attr]
    t0 = time.monotonic()
    targets = [lab.start(f"tgt{i}", env) for i in range(4)]
    outs = [classify("two sources", t, ref, t0, timeout=90) for t in targets]
    served = {}
    for s in (a, b):
        served[s.name] = sum(1 for line in s.sidecar.lines[marks[s.name]:]  # type: ignore[union-attr]
                             if re.search(r"rank=0 peer=.*\] served a reader", line))
    out = _worst(outs, "two sources share a burst", t0)
    out.note = f"{out.note}; rank-0 sessions per source {served}"
    if out.outcome == "received" and min(served.values()) == 0:
        out.note = f"expected both sources to serve: {served}"
    for x in (*targets, b, a):
        lab.stop(x)
    return out


FANOUT: dict[str, Callable[[Lab, random.Random], Outcome]] = {
    "source_killed_mid_pass": source_killed_mid_pass,
    "late_joiner": late_joiner,
    "two_sources_burst": two_sources_share_a_burst,
}
