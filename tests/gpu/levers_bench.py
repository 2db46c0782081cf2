"""Time-to-ready levers on one GPU: CUDA IPC handle import and device checksums, before/after, in one run.

An engine process (tests/gpu/gpu_procs.py engine) allocates the benchmark's Llama layout (hidden 2048, 112 layers:
1013 tensors, 9.65 GiB bf16, each tensor its own allocation as an engine's are) and exports one CUDA IPC handle per
allocation segment. This process imports them as the sidecar does, then checksums the imported tensors:
  per_tensor_torch   device_checksum() per tensor: ~10 torch launches and a sync per tensor (before)
  per_tensor_kernel  CudaOps.checksum() per tensor: one launch of the batched kernel per tensor (what today's
                     per-entry StreamingVerifier gets without any change to its code)
  batched_all        CudaOps.checksum_many() over all tensors: one launch (a source's publish)
  batched_per_chunk  checksum_many() per 256 MiB chunk of consecutive tensors (a verifier batching per chunk)
and the same over 10,000 small tensors (16 KiB each) to show the per-tensor cost. All results must agree.
Import: serial (today's RankMemory.import_manifest) and, for a second engine, with 8 threads.

Writes $OUT/levers.json and prints it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

CFG = {"hidden": 2048, "intermediate": 5632, "layers": 112, "vocab": 32000, "kv_heads_ratio": 4}
CHUNK = 256 << 20


def best(fn: Any, reps: int = 3) -> tuple[float, Any]:
    fn()  # warm-up
    times, res = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return min(times), res


def checksum_methods(items: list[tuple[int, int]], ops: Any) -> dict[str, Any]:
    from sidecar.memory.cuda import device_checksum

    chunks: list[list[tuple[int, int]]] = [[]]
    acc = 0
    for it in items:
        if acc + it[1] > CHUNK and chunks[-1]:
            chunks.append([])
            acc = 0
        chunks[-1].append(it)
        acc += it[1]
    methods = {
        "per_tensor_torch": lambda: [device_checksum(a, n, ops.device_id) for a, n in items],
        "per_tensor_kernel": lambda: [ops.checksum(a, n) for a, n in items],
        "batched_all": lambda: ops.checksum_many(items),
        "batched_per_chunk": lambda: [s for c in chunks for s in ops.checksum_many(c)],
    }
    total = sum(n for _, n in items)
    out: dict[str, Any] = {"tensors": len(items), "bytes": total, "chunks": len(chunks)}
    ref = None
    for name, fn in methods.items():
        s, res = best(fn)
        ref = res if ref is None else ref
        out[name] = {"s": round(s, 5), "s_per_1k_tensors": round(s / len(items) * 1000, 5),
                     "s_per_gb": round(s / (total / 1e9), 5), "agrees": res == ref}
    return out


def import_handles(handles: list[Any], threads: int) -> tuple[float, list[Any]]:
    from sidecar.memory.cuda import import_cuda_ipc

    t0 = time.perf_counter()
    if threads <= 1:
        regions = [import_cuda_ipc(h) for h in handles]
    else:
        with ThreadPoolExecutor(threads) as pool:
            regions = list(pool.map(import_cuda_ipc, handles))
    return time.perf_counter() - t0, regions


def main() -> int:
    import torch
    from test_cuda_ipc import _Engine, _handles

    from sidecar.lab.toy_engine import layout
    from sidecar.memory.cuda import CudaOps

    out_dir = Path(os.environ.get("OUT", ".gpu-out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = [[name, "bfloat16", shape, ""] for name, shape in layout(CFG, 1, 0).items()]
    rep: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "cfg": CFG}
    ops = CudaOps(0)
    t0 = time.perf_counter()
    assert ops._warm is not None
    ops._warm.join()
    rep["warm_up_s"] = round(time.perf_counter() - t0, 3)
    e1 = _Engine({"device": 0, "fill": "random", "seed": 1, "layout": spec, "digests": False})
    try:
        handles = _handles(e1.reply)
        rep["engine"] = {"tensors": len(e1.reply["entries"]), "handles": len(handles), "bytes": e1.reply["bytes"],
                         "export_s": round(e1.reply["export_s"], 4)}
        s, regions = import_handles(handles, 1)
        rep["import_serial"] = {"s": round(s, 4), "handles": len(handles),
                                "ms_per_handle": round(s / len(handles) * 1e3, 4)}
        base = [r.addr for r in regions]
        items = [(base[h] + off, n) for _, h, off, n in e1.reply["entries"] if n > 0]
        rep["checksums_llama"] = checksum_methods(items, ops)
        for r in regions:
            r.close()
    finally:
        e1.stop()
    e2 = _Engine({"device": 0, "fill": "zeros", "seed": 2, "layout": spec, "digests": False})
    try:
        handles = _handles(e2.reply)
        s, regions = import_handles(handles, 8)
        rep["import_8_threads"] = {"s": round(s, 4), "handles": len(handles),
                                   "ms_per_handle": round(s / len(handles) * 1e3, 4)}
        for r in regions:
            r.close()
    finally:
        e2.stop()
    small = torch.randint(0, 256, (10_000 * 16384,), dtype=torch.uint8, device="cuda:0")
    items = [(small.data_ptr() + i * 16384, 16384) for i in range(10_000)]
    rep["checksums_small"] = checksum_methods(items, ops)
    (out_dir / "levers.json").write_text(json.dumps(rep, indent=1))
    print(json.dumps(rep, indent=1))
    ok = all(m.get("agrees", True) for k in ("checksums_llama", "checksums_small")
             for m in rep[k].values() if isinstance(m, dict))
    print("LEVERS", "OK" if ok else "FAILED: checksum methods disagree")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
