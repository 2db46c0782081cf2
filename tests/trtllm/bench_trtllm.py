"""CPU benchmark of the file-level path (`make bench-trtllm`): a generated TP=2 TRT-LLM checkpoint is published by one
process (+ sidecar) and received by loader processes (+ sidecars) over NIXL (DRAM), against copying the same files
from local disk in the same run (page cache cold and warm). Writes docs/benchmarks/trtllm-cpu.json.

    python -m tests.trtllm.bench_trtllm [--layers 24] [--runs 3] [--out docs/benchmarks/trtllm-cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sidecar.lab.demo import evict_from_page_cache
from sidecar.lab.embedded_redis import EmbeddedRedis
from tests.trtllm.checkpoints import digests, make_trtllm_checkpoint
from tests.trtllm.procs import FilesNode


def copy_seconds(src: Path, dst: Path, cold: bool, sha256: bool = False) -> float:
    """Baseline: copy every file of the checkpoint to another directory on the same disk (what a loader without a
    peer does from a local or mounted copy). Cold: the source files are evicted from the page cache first.
    sha256: hash while copying, as the loader verifies what it writes."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    files = sorted(p for p in src.iterdir() if p.is_file())
    if cold:
        for f in files:
            evict_from_page_cache(f)
    t0 = time.monotonic()
    for f in files:
        if not sha256:
            shutil.copyfile(f, dst / f.name)
            continue
        h = hashlib.sha256()
        with open(f, "rb") as fi, open(dst / f.name, "wb") as fo:
            while chunk := fi.read(64 << 20):
                h.update(chunk)
                fo.write(chunk)
        h.hexdigest()
    return time.monotonic() - t0


def one_load(work: Path, url: str, model: str, i: int) -> dict[str, Any]:
    out = work / f"out{i}"
    t0 = time.monotonic()
    tgt = FilesNode(f"tgt{i}", ["load", "--model-name", model, "--output-dir", str(out), "--skip-build"], work, url)
    try:
        res = tgt.result("MX_LOADED", 300)
        if tgt.exit_code(60) != 0:
            raise RuntimeError(f"loader {i} failed:\n{tgt.log()[-2000:]}")
        wall = time.monotonic() - t0
        assert tgt.sidecar is not None
        m = tgt.sidecar.wait_for(r"phase=receive ([\d.]+) GB in ([\d.]+)s \(([\d.]+) GB/s\)", 5)
        res.update(process_wall_s=round(wall, 3), sidecar_receive_s=float(m.group(2)),
                   sidecar_receive_gbps=float(m.group(3)), out=str(out / "checkpoint"))
        return res
    finally:
        tgt.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default="docs/benchmarks/trtllm-cpu.json")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mx-bench-trtllm-"))
    load0 = os.getloadavg()[0]  # the machine may be shared: the figures scale with what others run
    try:
        t0 = time.monotonic()
        ckpt = make_trtllm_checkpoint(work / "ckpt", 2, {"layers": a.layers})
        nbytes = sum(f.stat().st_size for f in ckpt.iterdir())
        print(f"checkpoint {ckpt}: {nbytes / 1e9:.3f} GB in {time.monotonic() - t0:.1f}s", flush=True)
        want = digests(ckpt)
        copies = {"cold": [copy_seconds(ckpt, work / "copy", True) for _ in range(a.runs)],
                  "warm": [copy_seconds(ckpt, work / "copy", False) for _ in range(a.runs)],
                  "cold_sha256": [copy_seconds(ckpt, work / "copy", True, sha256=True) for _ in range(a.runs)]}
        with EmbeddedRedis() as r:
            t_pub = time.monotonic()
            pub = FilesNode("pub", ["publish", str(ckpt), "--model-name", "bench-trt"], work, r.url)
            try:
                published = pub.result("MX_PUBLISHED", 300)
                assert pub.sidecar is not None
                pub.sidecar.wait_for(r"serving as a source", 120)
                publish_wall = time.monotonic() - t_pub
                loads = []
                for i in range(a.runs):
                    res = one_load(work, r.url, "bench-trt", i)
                    if digests(Path(res["out"])) != want:
                        raise RuntimeError(f"run {i}: received files differ")
                    shutil.rmtree(Path(res["out"]).parent)
                    loads.append(res)
                    print(json.dumps({k: v for k, v in res.items() if k != "ranks"}), flush=True)
            finally:
                pub.stop()
        med = statistics.median
        result = {
            "date": datetime.date.today().isoformat(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "load_average_1m_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)]},
            "checkpoint": {"tp": 2, "layers": a.layers, "files": len(want), "bytes": nbytes,
                           "dtypes": "bf16 + float8_e4m3fn + int8 weights, fp32/bf16 scales"},
            "publisher": {"read_and_hash_s": published["load_s"], "ready_wall_s": round(publish_wall, 3)},
            "runs": a.runs,
            "p2p": {
                "sidecar_receive_s": med(x["sidecar_receive_s"] for x in loads),
                "sidecar_receive_gbps": med(x["sidecar_receive_gbps"] for x in loads),
                "loader_receive_s": med(x["receive_s"] for x in loads),
                "loader_hash_write_s": med(x["hash_write_s"] for x in loads),
                "loader_total_s": med(x["total_s"] for x in loads),
                "loader_total_gbps": round(nbytes / 1e9 / med(x["total_s"] for x in loads), 3),
                "process_wall_s": med(x["process_wall_s"] for x in loads),
            },
            "disk_copy": {
                "cold_s": round(med(copies["cold"]), 3), "warm_s": round(med(copies["warm"]), 3),
                "cold_gbps": round(nbytes / 1e9 / med(copies["cold"]), 3),
                "warm_gbps": round(nbytes / 1e9 / med(copies["warm"]), 3),
                "cold_sha256_s": round(med(copies["cold_sha256"]), 3),
                "cold_sha256_gbps": round(nbytes / 1e9 / med(copies["cold_sha256"]), 3),
            },
            "raw": {"loads": [{k: v for k, v in x.items() if k != "out"} for x in loads], "copies": copies},
        }
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        q, d = result["p2p"], result["disk_copy"]
        print(f"\n| {nbytes / 1e9:.3f} GB, {len(want)} files | seconds | GB/s |\n|---|---|---|\n"
              f"| NIXL receive (sidecar: import, session, transfer, checksums) | {q['sidecar_receive_s']:.3f} | "
              f"{q['sidecar_receive_gbps']:.2f} |\n"
              f"| loader: query -> files verified (SHA-256) and written | {q['loader_total_s']:.3f} | "
              f"{q['loader_total_gbps']:.2f} |\n"
              f"| loader process start -> exit (with its sidecar starting beside it) | {q['process_wall_s']:.3f} | "
              f"{nbytes / 1e9 / q['process_wall_s']:.2f} |\n"
              f"| copy from local disk, page cache cold | {d['cold_s']:.3f} | {d['cold_gbps']:.2f} |\n"
              f"| copy from local disk, page cache warm | {d['warm_s']:.3f} | {d['warm_gbps']:.2f} |\n"
              f"| copy from local disk with SHA-256, cold | {d['cold_sha256_s']:.3f} | {d['cold_sha256_gbps']:.2f} |")
        print(f"wrote {a.out}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
