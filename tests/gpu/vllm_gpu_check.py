"""vLLM on a real GPU with `--load-format mx-sidecar`: plain vLLM, then replica A (loads from storage, a source) and
replica B (receives A's weights through its sidecar: CUDA IPC on both sides, NIXL between the sidecars), on one GPU.

Real processes: `python -m tests.vllm.engine` (vLLM V1, its engine-core process holds the worker), `python -m sidecar
run` per replica, a local valkey-server. The tiny Llama is built here with transformers (nothing is downloaded).
Passes when B received (not loaded), B's greedy tokens equal A's and plain vLLM's, and every tensor's digest taken
inside B's worker equals A's. Writes $OUT/vllm_gpu.json (tokens, outcomes, tensors, phases of both sidecars, timings).

    python3 tests/gpu/vllm_gpu_check.py [--gpu-memory-utilization 0.35] [--hidden 256 --layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VLLM_ENV = {  # what the carried vLLM needs on the device machine (see tests/gpu/README.md)
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # flashinfer is not carried
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def _phases(lines: list[str]) -> list[str]:
    keep = ("phase=", "serving as", "WARN", "ERROR", "engine released", "pulling", "verification")
    return [ln for ln in lines if any(k in ln for k in keep)]


def _engine_notes(lines: list[str]) -> list[str]:
    keep = ("mx:", "rank 0", "Loading weights took", "Model loading took", "Available KV cache", "backend",
            "Traceback", "Error", "error")
    return [ln for ln in lines if any(k in ln for k in keep)][-60:]


def main() -> int:
    from sidecar.lab.embedded_redis import EmbeddedRedis
    from tests.vllm.replica import VllmReplica
    from tests.vllm.tiny_llama import make_tiny_llama

    p = argparse.ArgumentParser()
    p.add_argument("--gpu-memory-utilization", default="0.35")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--kv-cache-dtype", default="auto", help="e.g. fp8: the KV-cache scales are derived state")
    a = p.parse_args()
    os.environ.update({k: v for k, v in VLLM_ENV.items() if k not in os.environ})
    out_dir = Path(os.environ.get("OUT", ".gpu-out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mx-vllm-gpu-"))
    t0 = time.monotonic()
    ckpt = make_tiny_llama(work / "tiny", "bfloat16", hidden=a.hidden, layers=a.layers,
                           intermediate=a.hidden * 2, heads=max(1, a.hidden // 64), kv_heads=max(1, a.hidden // 128))
    rep: dict[str, Any] = {"model": {"hidden": a.hidden, "layers": a.layers, "dtype": "bfloat16",
                                     "kv_cache_dtype": a.kv_cache_dtype},
                           "checkpoint_s": round(time.monotonic() - t0, 2)}
    eargs = ["--gpu-memory-utilization", a.gpu_memory_utilization, "--kv-cache-dtype", a.kv_cache_dtype]
    suffix = "" if a.kv_cache_dtype == "auto" else f"_{a.kv_cache_dtype}"
    ok = False
    made: list[VllmReplica] = []
    try:
        import vllm

        rep["vllm"] = vllm.__version__
        plain = VllmReplica("plain", ckpt, work, load_format="auto", sidecar=False,
                            engine_args=[*eargs, "--exit-after-ready"])
        made.append(plain)
        res_p = plain.result(a.timeout)
        rp = res_p["ranks"]["0"]
        rep["plain"] = {"ready_s": res_p["ready_s"], "tokens": res_p["tokens"], "tensors": rp["tensors"],
                        "bytes": rp["bytes"], "notes": _engine_notes(plain.engine.lines)}
        plain.engine.p.wait(120)
        with EmbeddedRedis() as redis:
            src = VllmReplica("a", ckpt, work, redis.url, engine_args=eargs)
            made.append(src)
            res_a = src.result(a.timeout)
            src.wait_serving(120)
            tgt = VllmReplica("b", ckpt, work, redis.url, engine_args=eargs)
            made.append(tgt)
            res_b = tgt.result(a.timeout)
            assert tgt.sidecar is not None and src.sidecar is not None
            tgt.sidecar.wait_for(r"serving as a source", 60)
            ra, rb = res_a["ranks"]["0"], res_b["ranks"]["0"]
            same_digests = ra["digests"] == rb["digests"]
            rep["digests_equal_plain"] = ra["digests"] == res_p["ranks"]["0"]["digests"]
            differ = sorted(n for n in ra["digests"] if ra["digests"][n] != rb["digests"].get(n))
            rep["source"] = {"ready_s": res_a["ready_s"], "outcome": ra["outcome"], "tokens": res_a["tokens"],
                             "tensors": ra["tensors"], "bytes": ra["bytes"], "phases": _phases(src.sidecar.lines),
                             "notes": _engine_notes(src.engine.lines)}
            rep["target"] = {"ready_s": res_b["ready_s"], "outcome": rb["outcome"], "tokens": res_b["tokens"],
                             "tensors": rb["tensors"], "bytes": rb["bytes"], "phases": _phases(tgt.sidecar.lines),
                             "notes": _engine_notes(tgt.engine.lines)}
            rep["digests_equal"] = same_digests
            rep["digests_differ"] = differ[:20]
            rep["tokens_identical"] = res_b["tokens"] == res_a["tokens"] == res_p["tokens"]
            received = [ln for ln in tgt.engine.lines if re.search(r"weights received in", ln)]
            rep["target_weights_line"] = received[-1] if received else None
            ok = rb["outcome"] == "received" and ra["outcome"] == "loaded" and rep["tokens_identical"] and same_digests
    except Exception as e:
        rep["error"] = repr(e)[-3000:]
    finally:
        for r in reversed(made):
            r.stop()
        logs = {f"{r.name}-{kind}": proc.lines[-300:] for r in made
                for kind, proc in (("engine", r.engine), ("sidecar", r.sidecar)) if proc is not None}
        (out_dir / f"vllm_gpu{suffix}_logs.txt").write_text(
            "\n".join(f"===== {k}\n" + "\n".join(v) for k, v in logs.items()) + "\n")
    rep["ok"] = ok
    rep["wall_s"] = round(time.monotonic() - t0, 1)
    (out_dir / f"vllm_gpu{suffix}.json").write_text(json.dumps(rep, indent=1))
    print(json.dumps({k: v for k, v in rep.items() if k not in ("plain", "source", "target")}, indent=1))
    for k in ("plain", "source", "target"):
        if k in rep:
            print(k, json.dumps({x: y for x, y in rep[k].items() if x not in ("notes",)})[:2500])
    print("VLLM GPU CHECK", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
