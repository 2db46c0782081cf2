"""Fault scenarios through real processes, Redis, ZMQ and NIXL: used by the `test_fault_*` tests (quick profile)
and by `make chaos` (tests/chaos.py, hundreds of randomized runs).

Every scenario ends by classifying the target engine: `received` (bytes from a peer), `fell_back` (loaded from
storage) or `blocked` (never released). `wrong` counts an engine released on bytes that differ from the
checkpoint's, and a source that published such bytes: it must always be 0.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from sidecar.lab.embedded_redis import EmbeddedRedis
from sidecar.lab.replica_procs import Replica

# Fast failure detection for tests; still well above what a loaded 2-core CI box needs per step.
FAST_ENV = {
    "MX_HEARTBEAT_INTERVAL": "0.5",
    "MX_SOURCE_TTL": "3",
    "MX_SEED_LEASE_TTL": "3",
    "MX_POLL_INTERVAL": "0.1",
    "MX_STALL_TIMEOUT": "10",
    "MX_LOG_LEVEL": "info",
}
# Many small chunks, each READ a little delayed: a transfer lasts long enough to be hit in the middle.
SLOW_TRANSFER = {"MX_STAGING_SLOT_BYTES": "64KiB", "MX_STAGING_SLOTS": "3",
                 "MX_TEST_FAILPOINTS": "before_read=sleep:0.03"}


@dataclass
class Outcome:
    scenario: str
    outcome: str  # received | fell_back | blocked
    wrong: bool
    recover_s: float
    note: str = ""


@dataclass
class Lab:
    """A Redis, a checkpoint, a work dir; replicas made on demand and all stopped at the end."""

    redis: EmbeddedRedis
    checkpoint: Path
    work: Path
    made: list[Replica] = field(default_factory=list)
    n: int = 0

    def start(self, name: str, extra_env: dict[str, str] | None = None, **kw: object) -> Replica:
        self.n += 1
        env = {**FAST_ENV, **(extra_env or {})}
        r = Replica(f"{name}{self.n}", kw.pop("checkpoint", self.checkpoint), self.redis.url, self.work,  # type: ignore[arg-type]
                    extra_env=env, **kw)  # type: ignore[arg-type]
        self.made.append(r)
        return r

    def stop(self, r: Replica) -> None:
        if r.sidecar is not None:
            r.sidecar.signal(signal.SIGCONT)
        r.stop()
        if r in self.made:
            self.made.remove(r)

    def close(self) -> None:
        for r in reversed(self.made):
            self.stop(r)

    def sources(self) -> list[str]:
        from sidecar.contract.codec import decode
        from sidecar.contract.messages import Sealed, SourceRecord

        r = redis.Redis.from_url(self.redis.url)
        out = []
        for k in r.scan_iter("mx:*:src:*"):
            blob = r.get(k)
            if blob:
                out.append(decode(SourceRecord, decode(Sealed, blob).body).replica)
        return out


def results(rep: Replica, timeout: float) -> dict[int, dict] | None:  # type: ignore[type-arg]
    try:
        return rep.engine_results(timeout)
    except TimeoutError:
        return None


def classify(scenario: str, rep: Replica, ref: dict[int, dict], t0: float, timeout: float = 60,  # type: ignore[type-arg]
             note: str = "") -> Outcome:
    res = results(rep, timeout)
    if res is None:
        return Outcome(scenario, "blocked", False, time.monotonic() - t0, note)
    outcomes = {res[r]["outcome"] for r in res}
    wrong = any(res[r]["digests"] != ref[r]["digests"] for r in res)
    kind = "received" if outcomes == {"received"} else "fell_back"
    return Outcome(scenario, kind, wrong, time.monotonic() - t0, note)


def recheck_wrong(rep: Replica, ref: dict[int, dict]) -> bool:  # type: ignore[type-arg]
    """The engine's bytes re-digested now (SIGUSR2), long after its verdict."""
    rep.engine.signal(signal.SIGUSR2)
    wrong = False
    for r in ref:
        m = rep.engine.wait_for(rf'"event": "recheck", "rank": {r}, .*', 15)
        line = json.loads(m.string)
        wrong = wrong or line["digests"] != ref[r]["digests"]
    return wrong


def seed(lab: Lab, extra_env: dict[str, str] | None = None) -> tuple[Replica, dict[int, dict]]:  # type: ignore[type-arg]
    a = lab.start("src", extra_env)
    ref = a.engine_results(120)
    assert all(ref[r]["outcome"] == "loaded" for r in ref)
    a.wait_serving(60)
    return a, ref


# ---------------------------------------------------------------------------------------------- scenarios
def source_fault_mid_transfer(lab: Lab, rng: random.Random, mode: str, sig: str) -> Outcome:
    """The source sidecar is SIGKILLed or SIGSTOPped at a random point of a transfer (SIGSTOP: resumed after the
    target's verdict, so its late READ completions and notifications arrive). A target whose READs could not be
    confirmed drained exits without a verdict (engine blocked); like Kubernetes, the scenario then starts a new
    sidecar, which takes the rank over after MX_SIDECAR_TIMEOUT."""
    env = {**SLOW_TRANSFER, "MX_SOURCE_MODE": mode}
    a, ref = seed(lab, env)
    b = lab.start("tgt", {**env, "MX_STALL_TIMEOUT": "2"}, sidecar_timeout=3.0)
    b.sidecar.wait_for(r"pulling .* from", 60)  # type: ignore[union-attr]
    time.sleep(rng.uniform(0, 1.5))
    t0 = time.monotonic()
    a.sidecar.signal(signal.SIGKILL if sig == "kill" else signal.SIGSTOP)  # type: ignore[union-attr]
    note = ""
    if results(b, 30) is None and b.sidecar.p.poll() is not None:  # type: ignore[union-attr]
        note = f"target sidecar exited {b.sidecar.p.poll()} without a verdict; a new one took over"  # type: ignore[union-attr]
        if sig == "stop":
            a.sidecar.signal(signal.SIGCONT)  # type: ignore[union-attr]
        b.new_sidecar({"MX_TEST_FAILPOINTS": ""})
    out = classify(f"source {sig} mid-transfer ({mode})", b, ref, t0, note=note)
    if sig == "stop":
        a.sidecar.signal(signal.SIGCONT)  # type: ignore[union-attr]
        time.sleep(1.0)  # late READ completions / notifications, if any, land now
        if out.outcome != "blocked" and recheck_wrong(b, ref):
            out.wrong, out.note = True, "bytes changed after the verdict"
    lab.stop(b)
    lab.stop(a)
    return out


def target_killed_mid_receive(lab: Lab, rng: random.Random) -> Outcome:
    """The target sidecar dies mid-receive; Kubernetes starts a new one: it takes the rank over once the hook saw
    the old session silent for MX_SIDECAR_TIMEOUT, receives again, and post-processing ran exactly once."""
    a, ref = seed(lab, SLOW_TRANSFER)
    b = lab.start("tgt", SLOW_TRANSFER, sidecar_timeout=2.0)
    b.sidecar.wait_for(r"pulling .* from", 60)  # type: ignore[union-attr]
    time.sleep(rng.uniform(0, 1.0))
    b.sidecar.signal(signal.SIGKILL)  # type: ignore[union-attr]
    b.sidecar.p.wait(5)  # type: ignore[union-attr]
    t0 = time.monotonic()
    b.new_sidecar({"MX_TEST_FAILPOINTS": ""})
    out = classify("target sidecar killed mid-receive, new sidecar", b, ref, t0)
    res = results(b, 1)
    if res is not None and any(res[r]["prepared"] > 1 for r in res):
        out.wrong, out.note = True, "post-processing ran twice"
    lab.stop(b)
    lab.stop(a)
    return out


def slow_prepare(lab: Lab, rng: random.Random) -> Outcome:
    """prepare_target takes longer than MX_SIDECAR_TIMEOUT: no self-load race, the bytes are the source's."""
    a, ref = seed(lab)
    t0 = time.monotonic()
    b = lab.start("tgt", sidecar_timeout=1.5, engine_args=["--prepare-delay", f"{rng.uniform(3, 5):.1f}"])
    out = classify("prepare_target slower than MX_SIDECAR_TIMEOUT", b, ref, t0)
    if out.outcome != "received":
        out.note = "expected a receive"
    lab.stop(b)
    lab.stop(a)
    return out


def prepare_moves_tensors(lab: Lab, rng: random.Random) -> Outcome:
    """The engine moves tensors to new memory while it prepares (filled with 7s): the handles the sidecar mapped
    ahead for them are stale. Bytes written there instead of into the new tensors would show as wrong digests."""
    a, ref = seed(lab)
    n = rng.randint(1, 12)
    t0 = time.monotonic()
    b = lab.start("tgt", engine_args=["--prepare-delay", "1.2", "--prepare-realloc", str(n)])
    out = classify(f"prepare_target moves {n} tensors to new memory", b, ref, t0)
    if out.outcome == "received":
        lines = "\n".join(b.sidecar.lines)  # type: ignore[union-attr]
        ahead = [int(x) for x in re.findall(r"(\d+) mapped ahead", lines)]
        offered = [int(x) for x in re.findall(r"import \S+ of (\d+) handles", lines)]
        if not ahead or not (0 < ahead[0] < offered[0]):
            out.note = f"expected some but not all handles mapped ahead: {ahead} of {offered}"
    lab.stop(b)
    lab.stop(a)
    return out


def source_dies_while_target_prepares(lab: Lab, rng: random.Random) -> Outcome:
    """The source is killed after the target connected to it ahead of time, before any Hello: the target falls
    back (or finds another source) and drops the dead peer."""
    a, ref = seed(lab)
    t0 = time.monotonic()
    b = lab.start("tgt", engine_args=["--prepare-delay", "2"])
    b.sidecar.wait_for(r"phase=preconnect", 60)  # type: ignore[union-attr]
    time.sleep(rng.uniform(0, 1.0))
    a.sidecar.signal(signal.SIGKILL)  # type: ignore[union-attr]
    out = classify("source killed while the target prepares", b, ref, t0)
    lab.stop(b)
    lab.stop(a)
    return out


def source_engine_changes_weights(lab: Lab, rng: random.Random) -> Outcome:
    """The source's engine updates its weights in place while serving: the source withdraws at once, no later
    target receives the updated (or the old) bytes from it; the next replica loads from storage."""
    a, ref = seed(lab)
    a.engine.signal(signal.SIGUSR1)
    a.engine.wait_for(r'"event": "weights_updated"', 10)
    a.sidecar.wait_for(r"withdrawing as a source", 10)  # type: ignore[union-attr]
    t0 = time.monotonic()
    deadline = t0 + 10
    while lab.sources() and time.monotonic() < deadline:
        time.sleep(0.05)
    b = lab.start("tgt")
    out = classify("source engine updated its weights while serving", b, ref, t0)
    if out.outcome == "received":
        out.wrong, out.note = True, "received from a source whose engine changed"
    lab.stop(b)
    lab.stop(a)
    return out


def redis_fault(lab: Lab, rng: random.Random, phase: str, how: str) -> Outcome:
    """Redis restarted or stopped during a phase: role (before any replica), receive, publish, serve."""
    env = SLOW_TRANSFER if phase == "receive" else {}
    if phase == "role":
        if how == "down":
            lab.redis.down()
        t0 = time.monotonic()
        a = lab.start("solo", env)
        if how == "restart":
            lab.redis.restart()
        ref_like = results(a, 60)
        if how == "down":
            lab.redis.start()
        out = Outcome(f"Redis {how} during role", "fell_back" if ref_like else "blocked", False,
                      time.monotonic() - t0)
        lab.stop(a)
        return out
    a, ref = seed(lab, env)
    b = lab.start("tgt", env)
    if phase == "receive":
        b.sidecar.wait_for(r"pulling .* from", 60)  # type: ignore[union-attr]
    elif phase == "publish":
        b.sidecar.wait_for(r"phase=release", 60)  # type: ignore[union-attr]
    else:  # serve
        b.wait_serving(60)
    t0 = time.monotonic()
    if how == "restart":
        lab.redis.restart()
    else:
        lab.redis.down()
        time.sleep(rng.uniform(0.5, 2.0))
        lab.redis.start()
    out = classify(f"Redis {how} during {phase}", b, ref, t0)
    b.wait_serving(60)
    # It must end as a source again: the next replica receives from somebody, byte-identical.
    c = lab.start("next", env)
    nxt = classify("after", c, ref, t0)
    out.wrong = out.wrong or nxt.wrong
    lab.stop(c)
    lab.stop(b)
    lab.stop(a)
    return out


def stampede(lab: Lab, rng: random.Random, n: int) -> Outcome:
    """n replicas at once, no source: exactly one storage read; the rest receive."""
    t0 = time.monotonic()
    reps = [lab.start(f"herd{i}") for i in range(n)]
    res = [results(r, 240) for r in reps]
    loaded = sum(1 for x in res if x and x[0]["outcome"] == "loaded")
    ref = next(x for x in res if x and x[0]["outcome"] == "loaded")
    wrong = any(x and any(x[r]["digests"] != ref[r]["digests"] for r in x) for x in res)
    blocked = sum(1 for x in res if x is None)
    out = Outcome(f"{n} replicas at once", "received" if loaded == 1 and not blocked else "fell_back", wrong,
                  time.monotonic() - t0, f"{loaded} storage reads")
    for r in reps:
        lab.stop(r)
    return out


def seeder_killed_while_loading(lab: Lab, rng: random.Random) -> Outcome:
    """The seeder's sidecar dies while its engine loads: its lease expires, a waiting replica seeds instead."""
    a = lab.start("seeder", engine_args=["--load-delay", "4"])
    a.sidecar.wait_for(r"phase=role .*: seed", 60)  # type: ignore[union-attr]
    b = lab.start("waiter")
    a.sidecar.signal(signal.SIGKILL)  # type: ignore[union-attr]
    t0 = time.monotonic()
    res_b = results(b, 90)
    ok = res_b is not None and res_b[0]["outcome"] in ("loaded", "received")
    out = Outcome("seeder killed while loading", "fell_back" if ok else "blocked", False, time.monotonic() - t0)
    lab.stop(b)
    lab.stop(a)
    return out


def fence_unconfirmed(lab: Lab, rng: random.Random) -> Outcome:
    """A receive fails and its READs cannot be confirmed drained (failpoint): the sidecar exits without a verdict,
    the engine stays blocked; the next sidecar takes over after MX_SIDECAR_TIMEOUT and ends correct."""
    a, ref = seed(lab, SLOW_TRANSFER)
    b = lab.start("tgt", {**SLOW_TRANSFER, "MX_STALL_TIMEOUT": "2",
                          "MX_TEST_FAILPOINTS": "before_read=sleep:0.03,drain=raise"}, sidecar_timeout=2.0)
    b.sidecar.wait_for(r"pulling .* from", 60)  # type: ignore[union-attr]
    a.sidecar.signal(signal.SIGKILL)  # type: ignore[union-attr]
    t_kill = time.monotonic()
    while b.sidecar.p.poll() is None and time.monotonic() - t_kill < 60:  # type: ignore[union-attr]
        if results(b, 0.5) is not None:  # the transfer finished before the kill: no fence was needed
            out = classify("READs not confirmed drained", b, ref, t_kill, note="finished before the fault")
            lab.stop(b)
            lab.stop(a)
            return out
    code = b.sidecar.p.poll()  # type: ignore[union-attr]
    blocked = results(b, 3) is None
    t0 = time.monotonic()
    a2 = lab.start("src", {})  # a healthy source for the successor (or it loads from storage)
    a2.engine_results(120)
    b.new_sidecar({"MX_TEST_FAILPOINTS": ""})
    out = classify("READs not confirmed drained", b, ref, t0)
    if code != 4 or not blocked:
        out.wrong, out.note = True, f"exit {code}, engine blocked meanwhile: {blocked}"
    lab.stop(b)
    lab.stop(a2)
    lab.stop(a)
    return out


SCENARIOS: dict[str, Callable[[Lab, random.Random], Outcome]] = {
    "source_kill_direct": lambda lab, rng: source_fault_mid_transfer(lab, rng, "direct", "kill"),
    "source_kill_staged": lambda lab, rng: source_fault_mid_transfer(lab, rng, "staged", "kill"),
    "source_stop_direct": lambda lab, rng: source_fault_mid_transfer(lab, rng, "direct", "stop"),
    "source_stop_staged": lambda lab, rng: source_fault_mid_transfer(lab, rng, "staged", "stop"),
    "target_killed": target_killed_mid_receive,
    "slow_prepare": slow_prepare,
    "prepare_moves_tensors": prepare_moves_tensors,
    "source_dies_in_prepare": source_dies_while_target_prepares,
    "weights_changed": source_engine_changes_weights,
    "redis_restart_receive": lambda lab, rng: redis_fault(lab, rng, "receive", "restart"),
    "redis_down_receive": lambda lab, rng: redis_fault(lab, rng, "receive", "down"),
    "redis_down_publish": lambda lab, rng: redis_fault(lab, rng, "publish", "down"),
    "redis_restart_serve": lambda lab, rng: redis_fault(lab, rng, "serve", "restart"),
    "redis_down_role": lambda lab, rng: redis_fault(lab, rng, "role", "down"),
    "fence_unconfirmed": fence_unconfirmed,
    "seeder_killed": seeder_killed_while_loading,
}


def summarize(outcomes: list[Outcome]) -> list[dict[str, object]]:
    rows: dict[str, dict[str, object]] = {}
    for o in outcomes:
        r = rows.setdefault(o.scenario, {"scenario": o.scenario, "runs": 0, "received": 0, "fell_back": 0,
                                         "blocked": 0, "wrong_bytes": 0, "worst_recover_s": 0.0})
        r["runs"] = int(r["runs"]) + 1  # type: ignore[call-overload]
        r[o.outcome] = int(r[o.outcome]) + 1  # type: ignore[call-overload]
        r["wrong_bytes"] = int(r["wrong_bytes"]) + int(o.wrong)  # type: ignore[call-overload]
        r["worst_recover_s"] = round(max(float(r["worst_recover_s"]), o.recover_s), 2)  # type: ignore[arg-type]
    return list(rows.values())


def table(rows: list[dict[str, object]]) -> str:
    out = ["| scenario | runs | received | fell back | blocked | wrong bytes | worst time to recover (s) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scenario']} | {r['runs']} | {r['received']} | {r['fell_back']} | {r['blocked']} | "
                   f"{r['wrong_bytes']} | {r['worst_recover_s']} |")
    return "\n".join(out)


def dump(rows: list[dict[str, object]], path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": os.uname().nodename,
                                      "cores": os.cpu_count(), "rows": rows}, indent=1) + "\n")


__all__ = ["SCENARIOS", "Lab", "Outcome", "dump", "re", "summarize", "table"]
