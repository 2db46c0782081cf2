"""Peak /dev/shm of a CPU target whose receive fails and which then loads from storage (`make bench`).

A source serves; one checksum of its record is corrupted in Redis (as a buggy writer could), so the target's receive
fails verification and it falls back to storage with an engine that rebuilds its tensors for the retry (as vLLM
does). The /dev/shm segments the target's engine and sidecar map are summed every 10 ms from its start to its
release. Run twice in one go:
`before` keeps the failed attempt's memory mapped during the load (failpoint `release_attempt=raise`, the behaviour
until 2026-12-07), `after` is the shipped behaviour. Writes docs/benchmarks/cpu-fallback-memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import redis

from sidecar.contract.codec import decode, encode
from sidecar.contract.messages import Sealed, SourceRecord
from sidecar.lab.demo import ensure_checkpoint
from sidecar.lab.embedded_redis import EmbeddedRedis
from sidecar.lab.replica_procs import Replica

MODEL = {"hidden": 1024, "intermediate": 2816, "layers": 16, "vocab": 32000, "kv_heads_ratio": 1}
FAST = {"MX_HEARTBEAT_INTERVAL": "5", "MX_SOURCE_TTL": "60", "MX_LOG_LEVEL": "info"}


def pod_shm_bytes(pids: list[int]) -> int:
    """/dev/shm held by these processes: each shared-memory segment any of them maps, counted once (the engine and
    its sidecar map the same segments). Per process, not the whole tmpfs: other work on the machine does not count."""
    sizes: dict[tuple[str, str], int] = {}
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:  # the process ended
            continue
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/dev/shm/") or parts[5].startswith("/dev/shm/ucx_"):
                continue  # (UCX's own segments are a fixed few MB per agent, not the model's memory)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            key = (parts[3], parts[4])  # device, inode
            sizes[key] = max(sizes.get(key, 0), hi - lo)
    return sum(sizes.values())


class PeakSampler:
    """The highest /dev/shm use of the processes `pids()` names, seen while running."""

    def __init__(self, pids: Callable[[], list[int]], every_s: float = 0.01) -> None:
        self._pids = pids
        self.peak = 0
        self._every = every_s
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, pod_shm_bytes(self._pids()))

    def __enter__(self) -> PeakSampler:
        self._t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._t.join()


def corrupt_one_checksum(url: str, model: str, prefix: str = "mx") -> None:
    """Rewrite one checksum per rank of `model`'s one source record (the MAC stays the old one: valid only without a
    deployment key), keeping its TTL."""
    r = redis.Redis.from_url(url)
    for key in r.scan_iter(f"{prefix}:*:src:*"):
        blob = r.get(key)
        if not isinstance(blob, bytes):  # expired since the scan
            continue
        sealed = decode(Sealed, blob)
        rec = decode(SourceRecord, sealed.body)
        if rec.model == model:
            break
    else:
        raise RuntimeError(f"no source record of {model}")
    ranks = []
    for rank in rec.ranks:
        sums = list(rank.checksums)
        sums[len(sums) // 2] = "xxh3:0000000000000000"
        ranks.append(msgspec.structs.replace(rank, checksums=sums))
    body = encode(msgspec.structs.replace(rec, ranks=ranks))
    r.set(key, encode(msgspec.structs.replace(sealed, body=body)), keepttl=True)


def measure(ckpt: Path, url: str, work: Path, label: str, keep_mapped: bool, hold_s: float = 0.0) -> dict[str, float]:
    """Peak /dev/shm of the target pod (engine and sidecar) during one fallback (`label` names the model)."""
    model = f"fallback-{label}"
    src = Replica(f"src-{label}", ckpt, url, work, extra_env=FAST, model_id=model)
    try:
        src.engine_results(timeout=600)
        src.wait_serving(timeout=600)
        corrupt_one_checksum(url, model)
        # `hold_s`: the sidecar waits that long after the storage load, before re-importing (a small model's peak
        # lasts milliseconds otherwise: too short for a 10 ms sampler to be sure to see it)
        points = ["release_attempt=raise"] if keep_mapped else []
        points += [f"after_fallback_load=sleep:{hold_s}"] if hold_s else []
        env = {**FAST, **({"MX_TEST_FAILPOINTS": ",".join(points)} if points else {})}
        tgt = Replica(f"tgt-{label}", ckpt, url, work, extra_env=env, model_id=model,
                      engine_args=["--rebuild-on-retry"])
        try:
            with PeakSampler(lambda: [tgt.engine.p.pid] + ([tgt.sidecar.p.pid] if tgt.sidecar else [])) as s:
                res = tgt.engine_results(timeout=600)
                tgt.wait_serving(timeout=600)  # until the sidecar re-imported the new memory (and let the old go)
        finally:
            tgt.stop()
        if {res[r]["outcome"] for r in res} != {"loaded"}:
            raise RuntimeError(f"{label}: the target did not fall back to storage ({res})")
        model_bytes = sum(res[r]["bytes"] for r in res)
        return {"model_bytes": model_bytes, "peak_shm_bytes": s.peak, "peak_over_model": round(s.peak / model_bytes, 3)}
    finally:
        src.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default=".bench")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)
    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ckpt, ckpt_bytes = ensure_checkpoint(root, MODEL)
    work = Path(tempfile.mkdtemp(prefix="logs-fallback-", dir=root))
    redis_server = EmbeddedRedis().start()
    try:
        before = measure(ckpt, redis_server.url, work, "before", keep_mapped=True)
        after = measure(ckpt, redis_server.url, work, "after", keep_mapped=False)
    finally:
        redis_server.stop()
    ratio = after["peak_shm_bytes"] / before["peak_shm_bytes"]
    print(f"\n## CPU fallback after a failed receive: peak /dev/shm of the target, {time.strftime('%Y-%m-%d')}\n")
    print(f"Model: Llama-shaped, TP=2, {before['model_bytes'] / 1e9:.2f} GB in the engine; the engine rebuilds "
          "its tensors for the retry.\n")
    print("| | peak /dev/shm of the target pod (GB) | / model |")
    print("|---|---|---|")
    for name, r in (("before (attempt kept mapped)", before), ("after (released first)", after)):
        print(f"| {name} | {r['peak_shm_bytes'] / 1e9:.3f} | {r['peak_over_model']:.2f}x |")
    print(f"\nafter / before: {ratio:.2f}")
    if args.json:
        doc = {"date": time.strftime("%Y-%m-%d"),
               "machine": f"{os.cpu_count()} cores {platform.machine()}, Python {platform.python_version()}",
               "model": f"Llama-shaped {MODEL}, TP=2, checkpoint {ckpt_bytes} bytes bf16",
               "before": before, "after": after, "after_over_before": round(ratio, 3)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
