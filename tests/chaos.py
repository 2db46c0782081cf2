"""`make chaos`: the fault scenarios, randomized, hundreds of times; prints the table for docs/RELIABILITY.md and
writes docs/benchmarks/chaos.json. Usage: python -m tests.chaos [--runs N] [--seed S] [--only NAME,...]"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sidecar.lab.embedded_redis import EmbeddedRedis
from sidecar.lab.toy_engine import SMALL, make_checkpoint
from tests.faults import SCENARIOS as FAULTS
from tests.faults import Lab, Outcome, dump, stampede, summarize, table
from tests.faults_fanout import FANOUT
from tests.faults_pod_life import POD_LIFE

SCENARIOS = {**FAULTS, **POD_LIFE, **FANOUT}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=200, help="total randomized runs")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--only", default="")
    p.add_argument("--out", default="docs/benchmarks/chaos.json")
    p.add_argument("--keep", default="/tmp/mx-chaos-logs", help="where logs of blocked or wrong runs are kept")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    names = [n for n in SCENARIOS if not args.only or n in args.only.split(",")]
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as d, EmbeddedRedis() as redis:
        ckpt = Path(d) / "ckpt"
        make_checkpoint(ckpt, SMALL)
        for i in range(args.runs):
            name = "stampede8" if not args.only and i % 25 == 24 else rng.choice(names)
            work = Path(d) / f"run{i}"
            work.mkdir()
            lab = Lab(redis, ckpt, work)
            t0 = time.monotonic()
            try:
                out = stampede(lab, rng, 8) if name == "stampede8" else SCENARIOS[name](lab, rng)
            except Exception as e:  # a harness failure is not an outcome: show it, count it as blocked
                out = Outcome(name, "blocked", False, time.monotonic() - t0, f"harness: {e}")
            finally:
                lab.close()
            if out.outcome == "blocked" or out.wrong:  # keep the process logs of anything to look at
                shutil.copytree(work, Path(args.keep) / f"run{i}-{name}", dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.sock"))
            outcomes.append(out)
            print(f"[{i + 1}/{args.runs}] {out.scenario}: {out.outcome}{' WRONG' if out.wrong else ''} "
                  f"{out.recover_s:.1f}s {out.note}", flush=True)
    rows = summarize(outcomes)
    print(f"\nseed {args.seed}, {len(outcomes)} runs\n")
    print(table(rows))
    dump(rows, args.out)
    return 1 if any(o.wrong for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
