"""A burst of targets on one source, through real processes (`make bench`, and the quick profile in `make test`).

One source seeds (its storage load held until every target started); N targets start meanwhile and wait for it in
Redis; the moment it publishes they all receive at once. Measured: from the source's publication to the last target's
release (engine continues on verified weights), the storage reads (engines that loaded instead of receiving), and
whether every target holds the source's bytes. Each READ of a target is delayed (failpoint `before_read=sleep:S`): on
this machine every process shares 2 cores and the same DRAM, so without it a transfer is a few ms and the burst
measures process start-up; the delay stands for each target's own link, the case where the schedule decides.

Variants: `star` (MX_FANOUT_READERS=1: one reader per pass at a time, today's star without the carousel), `carousel`
(MX_FANOUT_READERS=8) and `tree` (MX_FANOUT_READERS=2: the rest wait busy and take the targets that finished), in
staged mode (64 KiB slots, as in the fault suite) and direct mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sidecar.lab.embedded_redis import EmbeddedRedis
from sidecar.lab.replica_procs import Replica
from sidecar.lab.toy_engine import SMALL, make_checkpoint

BASE_ENV = {"MX_HEARTBEAT_INTERVAL": "0.5", "MX_SOURCE_TTL": "5", "MX_SEED_LEASE_TTL": "10", "MX_POLL_INTERVAL": "0.1",
            "MX_STALL_TIMEOUT": "20", "MX_LOG_LEVEL": "info"}
STAGED = {"MX_SOURCE_MODE": "staged", "MX_STAGING_SLOT_BYTES": "64KiB", "MX_STAGING_SLOTS": "4"}
DIRECT = {"MX_SOURCE_MODE": "direct", "MX_STAGING_SLOT_BYTES": "64KiB"}
VARIANTS = {"star": "1", "carousel": "8", "tree": "2"}


@dataclass
class Burst:
    mode: str
    variant: str
    targets: int
    all_ready_s: float  # source published -> last target released
    storage_reads: int  # engines that loaded from storage (the source's one included)
    identical: bool
    outcomes: list[str]
    moved_bytes: int
    pass_lines: list[str]  # the source's "staging pass" log lines: fills, readers, copy rate


def burst(work: Path, redis_url: str, ckpt: Path, n: int, mode: str, variant: str, read_delay: float,
          timeout: float = 180.0, devices: str = "cpu", extra_env: dict[str, str] | None = None) -> Burst:
    env = {**BASE_ENV, **(STAGED if mode == "staged" else DIRECT), "MX_FANOUT_READERS": VARIANTS[variant],
           "MX_REDIS_PREFIX": f"fan-{mode}-{variant}-{n}-{time.monotonic_ns()}", **(extra_env or {})}
    slow = {**env, "MX_TEST_FAILPOINTS": f"before_read=sleep:{read_delay}"} if read_delay > 0 else env
    made: list[Replica] = []
    work = work / f"{mode}-{variant}-{n}"
    work.mkdir()
    try:
        gate = work / "go"
        src = Replica("src", ckpt, redis_url, work, extra_env=env, engine_args=["--load-gate", str(gate)],
                      devices=devices)
        made.append(src)
        assert src.sidecar is not None
        src.sidecar.wait_for(r"phase=role .*: seed", 60)
        targets = [Replica(f"t{i}", ckpt, redis_url, work, extra_env=slow, devices=devices) for i in range(n)]
        made += targets
        for t in targets:
            assert t.sidecar is not None
            t.sidecar.wait_for(r"waiting for seeder", 60)
        gate.touch()  # every target waits in Redis: the source's load ends now
        t_pub = src.sidecar.time_of(r"phase=publish", 120)
        res_src = src.engine_results(timeout)
        results = [t.engine_results(timeout) for t in targets]
        ready = [t.sidecar.time_of(r"phase=release |phase=load_from_storage", timeout) for t in targets
                 if t.sidecar is not None]
        outcomes = [r[0]["outcome"] for r in results]
        identical = all(r[k]["digests"] == res_src[k]["digests"] for r in results for k in res_src)
        loads = 1 + sum(o != "received" for o in outcomes)
        moved = sum(int(r[k]["bytes"]) for r, o in zip(results, outcomes, strict=True) if o == "received" for k in r)
        passes = [line.split("] ", 1)[-1] for line in src.sidecar.lines if "staging pass of" in line]
        return Burst(mode, variant, n, max(ready) - t_pub, loads, identical, outcomes, moved, passes)
    finally:
        for r in reversed(made):
            r.stop()


def render(rows: list[Burst]) -> list[str]:
    """The Markdown table: each size against one target of the same mode and variant, from the same run."""
    one = {(r.mode, r.variant): r.all_ready_s for r in rows if r.targets == 1}
    table = ["| mode | variant | targets | all ready (s) | / one target | aggregate MB/s | storage reads | identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = one.get((r.mode, r.variant))
        ratio = f"{r.all_ready_s / base:.2f}x" if base else "-"
        table.append(f"| {r.mode} | {r.variant} | {r.targets} | {r.all_ready_s:.2f} | {ratio} | "
                     f"{r.moved_bytes / r.all_ready_s / 1e6:.1f} | {r.storage_reads} | "
                     f"{'yes' if r.identical else 'NO'} |")
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--modes", default="staged,direct")
    ap.add_argument("--variants", default="star,carousel,tree")
    ap.add_argument("--read-delay", type=float, default=0.03)
    ap.add_argument("--out", default="docs/benchmarks/fanout.json")
    args = ap.parse_args()
    rows: list[Burst] = []
    with tempfile.TemporaryDirectory(prefix="mx-fanout-") as d, EmbeddedRedis() as redis_server:
        work = Path(d)
        ckpt = work / "ckpt"
        make_checkpoint(ckpt, SMALL)
        for mode in args.modes.split(","):
            for variant in args.variants.split(","):
                if mode == "direct" and variant != "carousel":
                    continue  # direct mode has no pass: readers READ engine memory side by side
                for n in (int(x) for x in args.sizes.split(",")):
                    b = burst(work, redis_server.url, ckpt, n, mode, variant, args.read_delay)
                    rows.append(b)
                    print(json.dumps(asdict(b)), flush=True)
    table = render(rows)
    print("\n".join(table))
    out = {"date": time.strftime("%Y-%m-%d"),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
           "read_delay_s": args.read_delay, "model": SMALL, "rows": [asdict(r) for r in rows], "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(r.identical and r.storage_reads == 1 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
