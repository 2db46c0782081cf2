"""`make bench`: CPU figures, each against a baseline measured in the same run.

- pipeline GB/s for >= 1 GiB in >= 500 tensors (TP=2) vs a single-process memcpy of the same tensors;
- sidecar start-up: NIXL agent creation, handle import, registration;
- target time-to-ready vs loading the same safetensors from disk (cold and warm page cache).
Runs direct and staged source modes. Prints a markdown table; with --json PATH also writes the figures there
(`make bench` writes docs/benchmarks/cpu.json).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from sidecar.lab.demo import _metric, disk_load_seconds, ensure_checkpoint
from sidecar.lab.embedded_redis import EmbeddedRedis
from sidecar.lab.replica_procs import Replica

BENCH = {"hidden": 1024, "intermediate": 2816, "layers": 56, "vocab": 32000, "kv_heads_ratio": 1}


def memcpy_gbps(sizes: list[int]) -> float:
    """One process, one thread, the same tensor sizes: the raw memcpy ceiling of this machine."""
    total = sum(sizes)
    src = (ctypes.c_char * total)()
    dst = (ctypes.c_char * total)()
    ctypes.memset(src, 1, total)
    ctypes.memset(dst, 0, total)  # fault both buffers in before timing
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        off = 0
        for n in sizes:
            ctypes.memmove(ctypes.addressof(dst) + off, ctypes.addressof(src) + off, n)
            off += n
        best = min(best, time.perf_counter() - t0)
    return total / 1e9 / best


def run_mode(ckpt: Path, url: str, work: Path, mode: str) -> dict[str, float]:
    env = {"MX_SOURCE_MODE": mode, "MX_LOG_LEVEL": "info"}
    src = Replica(f"src-{mode}", ckpt, url, work, extra_env=env, model_id=f"bench-{mode}")
    try:
        src_res = src.engine_results(timeout=600)
        src.wait_serving(timeout=600)
        t0 = time.monotonic()
        tgt = Replica(f"tgt-{mode}", ckpt, url, work, extra_env=env, model_id=f"bench-{mode}")
        try:
            tgt_res = tgt.engine_results(timeout=600)
            wall_ready = time.monotonic() - t0
            tgt.wait_serving(timeout=120)
            _, text = tgt.http("/metrics")
            log = "\n".join(tgt.sidecar.lines) if tgt.sidecar else ""
            transfer_s = max(float(x) for x in re.findall(r"phase=transfer [\d.]+ GB in ([\d.]+)s", log))
            verify = re.findall(r"phase=verify .*, ([\d.]+)s after the last byte", log)
            verify_s = max([float(x) for x in verify] or [0.0])
            setup = re.findall(r"; setup ([\d.]+)s, stream", log)
            setup_s = max([float(x) for x in setup] or [0.0])
            ok = all(tgt_res[r]["digests"] == src_res[r]["digests"] for r in range(tgt.tp))
            outcomes = {tgt_res[r]["outcome"] for r in range(tgt.tp)}
            if not ok or outcomes != {"received"}:
                raise RuntimeError(f"{mode}: target did not receive identical bytes ({outcomes})")
            moved = _metric(text, "mx_transfer_bytes_total", 'role="target"')
            return {
                "bytes": moved,
                "tensors": sum(tgt_res[r]["tensors"] for r in range(tgt.tp)),
                "transfer_s": transfer_s,
                "verify_s": verify_s,
                "setup_s": setup_s,
                "receive_s": _metric(text, "mx_transfer_duration_seconds_sum", 'role="target"'),
                "agents_s": _metric(text, "mx_startup_seconds", 'phase="agents"'),
                "import_s": _metric(text, "mx_startup_seconds", 'phase="import"'),
                "register_s": _metric(text, "mx_startup_seconds", 'phase="register"'),
                "sidecar_ready_s": _metric(text, "mx_time_to_ready_seconds", 'role="target"'),
                "engine_ready_s": max(tgt_res[r]["seconds"] for r in range(tgt.tp)),
                "wall_ready_s": wall_ready,
                "source_load_s": max(src_res[r]["seconds"] for r in range(src.tp)),
            }
        finally:
            tgt.stop()
    finally:
        src.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default=".bench")
    p.add_argument("--modes", default="direct,staged")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)
    load_start = os.getloadavg()[0]  # 2 cores shared with whatever else runs: the load says how quiet it was
    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ckpt, ckpt_bytes = ensure_checkpoint(root, BENCH)
    from sidecar.lab.toy_engine import layout

    sizes = [2 * n for shape in layout(BENCH, 2, 0).values() for n in [_numel(shape)]] * 2
    work = Path(tempfile.mkdtemp(prefix="logs-", dir=root))  # kept: the logs show what UCX chose
    redis = EmbeddedRedis().start()
    try:
        memcpy = memcpy_gbps(sizes)
        cold = disk_load_seconds(ckpt, 2, cold=True)
        warm = disk_load_seconds(ckpt, 2, cold=False)
        results = {m: run_mode(ckpt, redis.url, work, m) for m in args.modes.split(",")}
    finally:
        redis.stop()
    print(f"\n## CPU benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}\n")
    print(f"Model: Llama-shaped, TP=2, {ckpt_bytes / 2**30:.2f} GiB checkpoint (bf16). "
          f"Baselines in the same run: single-process memcpy of the same tensor sizes {memcpy:.2f} GB/s; "
          f"loading the safetensors into both ranks' tensors {cold:.2f} s cold cache, {warm:.2f} s warm.\n")
    print("| mode | tensors | GB | transfer s | transfer GB/s | vs memcpy | verify s | agents s | import s | "
          "register s | target engine ready s | disk cold / ready | disk warm / ready |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m, r in results.items():
        gbps = r["bytes"] / 1e9 / r["transfer_s"]
        print(f"| {m} | {r['tensors']:.0f} | {r['bytes'] / 1e9:.2f} | {r['transfer_s']:.3f} | {gbps:.2f} | "
              f"{gbps / memcpy:.2f}x | {r['verify_s']:.3f} | {r['agents_s']:.2f} | {r['import_s']:.3f} | "
              f"{r['register_s']:.3f} | {r['engine_ready_s']:.2f} | {cold / r['engine_ready_s']:.2f}x | "
              f"{warm / r['engine_ready_s']:.2f}x |")
    if args.json:
        write_json(Path(args.json), results, memcpy, cold, warm, ckpt_bytes, load_start)
    print("\n`transfer` is the slowest rank's NIXL pipeline (ranks run in parallel); `target engine ready` runs from "
          "the target engine building its tensors to its release (connect, role, import, agents, transfer, "
          "verification included; process start and torch import excluded).")
    return 0


def write_json(path: Path, results: dict[str, dict[str, float]], memcpy: float, cold: float, warm: float,
               ckpt_bytes: int, load_start: float) -> None:
    """The machine-readable figures (keys shared with docs/benchmarks/gpu-1x.json where they apply)."""
    best = max(results, key=lambda m: results[m]["bytes"] / results[m]["transfer_s"])
    r = results[best]
    pipeline = r["bytes"] / 1e9 / r["transfer_s"]
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores {platform.machine()}, Python {platform.python_version()}",
        "load_average_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],  # at start, at end
        "model": f"Llama-shaped {BENCH}, TP=2, checkpoint {ckpt_bytes} bytes bf16",
        "tensors": int(r["tensors"]),
        "bytes": int(r["bytes"]),
        "best_mode": best,
        "pipeline_gbps": round(pipeline, 3),
        "memcpy_gbps": round(memcpy, 3),
        "ratio": round(pipeline / memcpy, 3),
        "import_s": round(r["import_s"], 4),
        "setup_s": round(r["setup_s"], 4),
        "verify_s": round(r["verify_s"], 4),
        "target_ready_s": round(r["engine_ready_s"], 3),
        "disk_cold_s": round(cold, 3),
        "disk_warm_s": round(warm, 3),
        "modes": {m: {k: round(v, 4) if isinstance(v, float) else v for k, v in x.items()}
                  for m, x in results.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
