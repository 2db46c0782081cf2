"""`make demo`: a real TP=2 transfer between two replicas on this machine, on the embedded defaults.

Builds a Llama-shaped checkpoint (seeded, nothing downloaded), starts Redis (unless MX_REDIS_URL is
set), a source replica that loads from storage and publishes, and a target replica that receives
both ranks over NIXL, verifies, and is released. Exits 0 only if every target tensor equals the
source's, compared in the engine processes themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from runtime_hooks.exposure import ModelIdentity
from sidecar import settings
from sidecar.lab.embedded_redis import EmbeddedRedis
from sidecar.lab.replica_procs import Replica
from sidecar.lab.toy_engine import DEMO, DTYPES, SMALL, ToyAdapter, make_checkpoint, rank_tensors


def ensure_checkpoint(root: Path, cfg: dict[str, int]) -> tuple[Path, int]:
    path = root / ("ckpt-" + "-".join(f"{k}{v}" for k, v in sorted(cfg.items())))
    if not (path / "config.json").exists():
        t0 = time.monotonic()
        nbytes = make_checkpoint(path, cfg)
        print(f"built checkpoint {path} ({nbytes / 1e6:.0f} MB) in {time.monotonic() - t0:.1f}s")
    return path, (path / "model.safetensors").stat().st_size


def evict_from_page_cache(path: Path) -> None:
    """Make the next read come from the disk, as a new pod's first read does (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_load_seconds(ckpt: Path, tp: int, cold: bool) -> float:
    """Baseline: load the same safetensors into every rank's tensors, as the source engine does."""
    meta = json.loads((ckpt / "config.json").read_text())
    if cold:
        evict_from_page_cache(ckpt / "model.safetensors")
    t0 = time.monotonic()
    for rank in range(tp):
        tensors = rank_tensors(meta["mx_toy"], tp, rank, DTYPES[meta["dtype"]])
        ToyAdapter(tensors, ModelIdentity("baseline", "r", meta["dtype"], rank, tp), ckpt).load_from_storage()
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--small", action="store_true", help="a 4 MB model instead of ~330 MB")
    p.add_argument("--workdir", default=".demo")
    args = p.parse_args(argv)
    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ckpt, ckpt_bytes = ensure_checkpoint(root, SMALL if args.small else DEMO)
    work = Path(tempfile.mkdtemp(prefix="mx-demo-", dir="/tmp"))
    redis = None
    url = settings.get("MX_REDIS_URL", default=None)
    if not url:
        redis = EmbeddedRedis().start()
        url = redis.url
        print(f"started embedded Redis at {url}")
    key_env = _deployment_key_env(work)
    replicas: list[Replica] = []
    try:
        cold = disk_load_seconds(ckpt, 2, cold=True)
        warm = disk_load_seconds(ckpt, 2, cold=False)
        t0 = time.monotonic()
        src = Replica("source", ckpt, url, work, extra_env=key_env)
        replicas.append(src)
        src_res = src.engine_results(timeout=300)
        src.wait_serving(timeout=300)
        print(f"source: {', '.join(r['outcome'] for r in src_res.values())} in {time.monotonic() - t0:.2f}s; "
              "published")
        t1 = time.monotonic()
        tgt = Replica("target", ckpt, url, work, extra_env=key_env)
        replicas.append(tgt)
        tgt_res = tgt.engine_results(timeout=300)
        ready_s = time.monotonic() - t1
        tgt.wait_serving(timeout=60)
        _, metrics = tgt.http("/metrics")
        moved = _metric(metrics, "mx_transfer_bytes_total", 'role="target"')
        seconds = _metric(metrics, "mx_transfer_duration_seconds_sum", 'role="target"')
        identical, differ = _compare(src_res, tgt_res, src.tp)
        outcomes = [tgt_res[r]["outcome"] for r in range(tgt.tp)]
        print(json.dumps({"checkpoint_bytes": ckpt_bytes, "target_outcomes": outcomes}))
        print(f"moved: {moved / 1e6:.1f} MB over NIXL in {seconds:.3f}s = {moved / 1e9 / max(seconds, 1e-9):.2f} GB/s")
        print(f"disk baseline (same run, same safetensors into both ranks' tensors): cold cache {cold:.3f}s, "
              f"warm cache {warm:.3f}s; transfer is {cold / max(seconds, 1e-9):.2f}x faster than cold, "
              f"{warm / max(seconds, 1e-9):.2f}x warm")
        print(f"target engine ready {ready_s:.2f}s after its start (process start, torch import, agents included)")
        if outcomes != ["received"] * tgt.tp or differ:
            print(f"FAILED: outcomes {outcomes}, {len(differ)} tensors differ: {differ[:5]}")
            return 1
        print(f"verified: {identical} tensors, identical")
        return 0
    finally:
        for rep in reversed(replicas):
            rep.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)


def _deployment_key_env(work: Path) -> dict[str, str]:
    """As deployed: a deployment key authenticates records, peer messages and engine commands (README: trust model)."""
    if settings.get("MX_AUTH_KEY_FILE"):
        return {}
    key = work / "deployment.key"
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o600)
    return {"MX_AUTH_KEY_FILE": str(key)}


def _compare(src_res: dict[int, dict], tgt_res: dict[int, dict], tp: int) -> tuple[int, list[str]]:
    """(tensors whose digests match, names of those that differ) between the source's and the target's engine."""
    identical, differ = 0, []
    for r in range(tp):
        a, b = src_res[r]["digests"], tgt_res[r]["digests"]
        for name in a:
            if a[name] == b.get(name):
                identical += 1
            else:
                differ.append(f"rank{r}:{name}")
    return identical, differ


def _metric(text: str, name: str, label: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


if __name__ == "__main__":
    sys.exit(main())
