"""Fault scenarios of the pod's own life (issue 18), randomized like the rest of tests/faults.py: the engine
container restarts under a serving or receiving sidecar, the sidecar restarts during its own storage load, SIGTERM
at a random point of a receive while READs drain slowly, a direct reader dies mid-read. Each ends with the engine
on the checkpoint's bytes or blocked, never anything else."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable

from tests.faults import SLOW_TRANSFER, Lab, Outcome, classify, results, seed


def engine_restarted_while_serving(lab: Lab, rng: random.Random) -> Outcome:
    """The source's engine is SIGKILLed and started again under its running sidecar: the sidecar starts the life
    over (a seed again), and a later target receives the new engine's bytes from it."""
    a, ref = seed(lab)
    time.sleep(rng.uniform(0, 1.5))
    mark = len(a.sidecar.lines)  # type: ignore[union-attr]
    t0 = time.monotonic()
    a.restart_engine()
    out = classify("engine restarted under a serving sidecar", a, ref, t0, timeout=60)
    if out.outcome != "blocked":
        a.sidecar.wait_for(r"serving as a source", 30, after=mark)  # type: ignore[union-attr]
        b = lab.start("tgt")
        later = classify("engine restarted under a serving sidecar", b, ref, t0, timeout=60)
        out.wrong = out.wrong or later.wrong
        out.note = f"then a target: {later.outcome}"
        lab.stop(b)
    if a.sidecar.p.poll() is not None:  # type: ignore[union-attr]
        out.wrong, out.note = True, f"the sidecar exited {a.sidecar.p.poll()} instead of starting over"  # type: ignore[union-attr]
    lab.stop(a)
    return out


def engine_restarted_mid_receive(lab: Lab, rng: random.Random) -> Outcome:
    """The target's engine restarts at a random point of its receive: the old attempt's READs are drained into
    memory only the sidecar still maps, and the new engine gets a life of its own (received or loaded)."""
    a, ref = seed(lab, SLOW_TRANSFER)
    b = lab.start("tgt", SLOW_TRANSFER)
    b.sidecar.wait_for(r"pulling .* from", 60)  # type: ignore[union-attr]
    time.sleep(rng.uniform(0, 1.0))
    t0 = time.monotonic()
    b.restart_engine()
    out = classify("engine restarted mid-receive", b, ref, t0, timeout=90)
    lab.stop(b)
    lab.stop(a)
    return out


def sidecar_restarted_during_its_load(lab: Lab, rng: random.Random) -> Outcome:
    """The seeder's sidecar is SIGKILLed while its engine loads from storage; the new sidecar waits for that load
    and serves it (before: exit 2 until the load ended, a crash-loop back-off)."""
    a = lab.start("seeder", engine_args=["--load-delay", f"{rng.uniform(2, 5):.1f}"])
    a.sidecar.wait_for(r"phase=role .*: seed", 60)  # type: ignore[union-attr]
    time.sleep(rng.uniform(0.2, 1.5))
    a.sidecar.signal(signal.SIGKILL)  # type: ignore[union-attr]
    a.sidecar.p.wait(10)  # type: ignore[union-attr]
    t0 = time.monotonic()
    restarted = a.new_sidecar()
    res = results(a, 60)
    if res is None:
        out = Outcome("sidecar restarted during its own load", "blocked", False, time.monotonic() - t0)
    else:
        out = Outcome("sidecar restarted during its own load", "fell_back", False, time.monotonic() - t0)
        restarted.wait_for(r"serving as a source", 30)
        if restarted.p.poll() is not None:
            out.wrong, out.note = True, f"the new sidecar exited {restarted.p.poll()}"
        else:
            b = lab.start("tgt")
            later = classify("sidecar restarted during its own load", b, res, t0)
            out.wrong, out.note = later.wrong, f"then a target: {later.outcome}"
            lab.stop(b)
    lab.stop(a)
    return out


def sigterm_mid_receive(lab: Lab, rng: random.Random) -> Outcome:
    """SIGTERM at a random point of a receive while the READ drain is slow (failpoint): no `abort` before the
    drain, or no verdict at all; a new sidecar then ends the engine on the source's bytes."""
    a, ref = seed(lab, SLOW_TRANSFER)
    drain = rng.uniform(0, 2.0)
    b = lab.start("tgt", {**SLOW_TRANSFER, "MX_TEST_FAILPOINTS": f"before_read=sleep:0.03,drain=sleep:{drain:.2f}"},
                  sidecar_timeout=3.0)
    b.sidecar.wait_for(r"pulling .* from", 60)  # type: ignore[union-attr]
    time.sleep(rng.uniform(0, 1.0))
    t0 = time.monotonic()
    b.sidecar.signal(signal.SIGTERM)  # type: ignore[union-attr]
    code = b.sidecar.p.wait(30)  # type: ignore[union-attr]
    b.new_sidecar({"MX_TEST_FAILPOINTS": ""})
    out = classify("SIGTERM mid-receive, slow drain", b, ref, t0, timeout=60, note=f"exit {code}")
    if code not in (0, 4):
        out.wrong, out.note = True, f"exit {code}: neither a drained stop nor a stop without verdict"
    lab.stop(b)
    lab.stop(a)
    return out


def direct_reader_killed(lab: Lab, rng: random.Random) -> Outcome:
    """A direct reader's sidecar is SIGKILLed mid-read (no Bye): the source frees its session once the reader's
    metadata expired and serves the next target."""
    a, ref = seed(lab)
    b = lab.start("tgt", {"MX_TEST_FAILPOINTS": "before_read=sleep:0.2", "MX_STAGING_SLOT_BYTES": "64KiB"})
    b.sidecar.wait_for(r"failpoint before_read", 60)  # type: ignore[union-attr]
    time.sleep(rng.uniform(0, 0.5))
    b.sidecar.signal(signal.SIGKILL)  # type: ignore[union-attr]
    t0 = time.monotonic()
    note = ""
    try:
        a.sidecar.wait_for(r"no longer refreshes its metadata .*; session dropped|served a reader", 20)  # type: ignore[union-attr]
    except TimeoutError:
        note = "the source kept the dead reader's session"
    c = lab.start("tgt")
    out = classify("direct reader killed mid-read", c, ref, t0, note=note)
    out.wrong = out.wrong or bool(note)
    lab.stop(c)
    lab.stop(b)
    lab.stop(a)
    return out


POD_LIFE: dict[str, Callable[[Lab, random.Random], Outcome]] = {
    "engine_restart_serving": engine_restarted_while_serving,
    "engine_restart_receive": engine_restarted_mid_receive,
    "sidecar_restart_loading": sidecar_restarted_during_its_load,
    "sigterm_mid_receive": sigterm_mid_receive,
    "direct_reader_killed": direct_reader_killed,
}
