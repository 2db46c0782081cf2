"""Time-to-ready levers on one GPU, before/after in one run: handles mapped ahead, session set up ahead.

"before" is the code of the commit before the levers (a `git archive` of sidecar/ and runtime_hooks/ carried in
MX_BEFORE_TREE), "after" the working tree; both run the same source + target pair of toy engines and sidecars on
GPU 0, alternating (before, after, before, after), each pair with its own Redis. From the target sidecar's log:
  import_s           mapping the engine's handles after prepare_target (phase=import_register "import")
  setup_s            Hello -> first READ posted (phase=transfer "setup")
  after_prepare_s    prepare_target done -> first READ posted: what the levers shorten
  ready_wo_transfer  sidecar time to ready minus the transfer itself (one GPU: the READs run over UCX TCP)
Writes $OUT/ttr.json.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

CFG = json.loads(os.environ.get("MX_TTR_CFG", '{"hidden": 1024, "intermediate": 2816, "layers": 112, '
                                               '"vocab": 32000, "kv_heads_ratio": 4}'))
DEVICE = os.environ.get("MX_TTR_DEVICE", "cuda:0")
TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _t(line: str) -> float:
    m = TS.match(line)
    assert m, line
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def one_pair(variant: str, tree: Path, ckpt: Path, work: Path) -> dict[str, Any]:
    from sidecar.lab.embedded_redis import EmbeddedRedis
    from sidecar.lab.replica_procs import Replica

    env = {"PYTHONPATH": f"{tree}:{os.environ.get('PYTHONPATH', '')}", "MX_SOURCE_MODE": "staged",
           "MX_LOG_LEVEL": "info", "MX_TP_SIZE": "1", "MX_STALL_TIMEOUT": "120"}
    d = work / f"{variant}-{time.monotonic_ns()}"
    d.mkdir()
    os.chdir(tree)  # `python -m` puts the working directory first on sys.path: it picks the variant's code
    with EmbeddedRedis() as redis:
        src = Replica("src", ckpt, redis.url, d, tp=1, extra_env=env, devices=DEVICE, engine_args=["--no-digests"])
        try:
            src.engine_results(300)
            src.wait_serving(300)
            tgt = Replica("tgt", ckpt, redis.url, d, tp=1, extra_env=env, devices=DEVICE,
                          engine_args=["--no-digests"])
            try:
                res = tgt.engine_results(600)
                tgt.wait_serving(120)
                _, metrics = tgt.http("/metrics")
                assert tgt.sidecar is not None
                lines = tgt.sidecar.lines
            finally:
                tgt.stop()
        finally:
            src.stop()
    assert res[0]["outcome"] == "received", res
    # Each pattern's first match: an extra match would be a second attempt, which this bench does not expect.
    def find(pat: str) -> tuple[str, re.Match[str]]:
        for ln in lines:
            m = re.search(pat, ln)
            if m:
                return ln, m
        raise AssertionError(f"{variant}: no line matching {pat!r}")

    prep_line, _ = find(r"phase=prepare_target")
    imp_line, imp = find(r"import ([\d.]+)s of (\d+) handles")
    tr_line, tr = find(r"phase=transfer ([\d.]+) GB in ([\d.]+)s .*setup ([\d.]+)s")
    ready = [float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
             if ln.startswith("mx_time_to_ready_seconds") and 'role="target"' in ln]
    transfer_s, setup_s = float(tr.group(2)), float(tr.group(3))
    first_read = _t(tr_line) - transfer_s + setup_s
    ahead = re.search(r"(\d+) mapped ahead", imp_line)
    pre = [ln for ln in lines if "phase=preconnect" in ln or "phase=prefetch" in ln]
    return {
        "variant": variant,
        "import_s": float(imp.group(1)),
        "handles": int(imp.group(2)),
        "mapped_ahead": int(ahead.group(1)) if ahead else 0,
        "setup_s": setup_s,
        "after_prepare_s": round(first_read - _t(prep_line), 4),
        "transfer_s": transfer_s,
        "gb": float(tr.group(1)),
        "ready_s": ready[0] if ready else None,
        "ready_wo_transfer_s": round(ready[0] - transfer_s, 4) if ready else None,
        "phases": [ln[24:] for ln in lines if "phase=" in ln],
        "ahead_lines": [ln[24:] for ln in pre],
    }


def main() -> int:
    from sidecar.lab.toy_engine import make_checkpoint

    before = Path(os.environ.get("MX_BEFORE_TREE", ROOT / ".gpu-carry" / "before")).resolve()
    if not (before / "sidecar" / "daemon.py").exists():
        print(f"no 'before' tree at {before} (git archive <commit> sidecar runtime_hooks)", file=sys.stderr)
        return 2
    reps = int(os.environ.get("MX_TTR_REPS", "2"))
    work = Path(tempfile.mkdtemp(prefix="mx-ttr-", dir="/tmp"))
    ckpt = work / "ckpt"
    make_checkpoint(ckpt, CFG)
    runs = []
    for _ in range(reps):
        for variant, tree in (("before", before), ("after", ROOT)):
            r = one_pair(variant, tree, ckpt, work)
            print(json.dumps({k: v for k, v in r.items() if k != "phases"}), flush=True)
            runs.append(r)
    out: dict[str, Any] = {"cfg": CFG, "runs": runs, "median": {}}
    for variant in ("before", "after"):
        rs = [r for r in runs if r["variant"] == variant]
        out["median"][variant] = {k: statistics.median(r[k] for r in rs)
                                  for k in ("import_s", "setup_s", "after_prepare_s", "ready_wo_transfer_s",
                                            "transfer_s", "handles", "mapped_ahead")}
    b, a = out["median"]["before"], out["median"]["after"]
    out["ratio_before_over_after"] = {k: round(b[k] / a[k], 2) if a[k] else None
                                      for k in ("import_s", "setup_s", "after_prepare_s", "ready_wo_transfer_s")}
    dest = Path(os.environ.get("OUT", ".gpu-out")) / "ttr.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps({"median": out["median"], "ratio": out["ratio_before_over_after"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
