"""sidecar.memory.cuda on cuda-bindings against the ctypes module it replaced, on one GPU, in one run.

  python3 tests/gpu/bindings_bench.py OLD_MODULE.py   # e.g. `git show <commit>:sidecar/memory/cuda.py > old.py`

An engine process allocates N_HANDLES tensors, each its own cudaMalloc (no caching allocator), and exports them
(runtime_hooks.cuda_ipc, on the new module). Fresh processes then measure, alternately for "before" (OLD_MODULE) and
"after" (sidecar.memory.cuda), best of REPS each: importing every handle (and closing them), one copy_many of all of
them into a staging buffer, 20,000 small copies (per-call cost), checksum_many over all, checksum per tensor.
Results must agree. The "after" process also probes the driver: the same handle opened twice in one process.
Writes $OUT/bindings_bench.json and prints it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
N_HANDLES = 451
REPS = int(os.environ.get("MX_BB_REPS", "5"))


def engine() -> None:
    import torch

    from runtime_hooks.cuda_ipc import export_cuda_tensors

    tensors = {}
    for i in range(N_HANDLES):
        n = (1 << 20) * (1 + i % 24) + 4 * (i % 5) + (i % 3)  # 1-24 MiB, some odd tails
        tensors[f"t{i}"] = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    handles, where = export_cuda_tensors(tensors)
    out = {"handles": [[h.device_uuid, h.handle.hex(), h.nbytes] for h in handles],
           "entries": [[where[k][0], where[k][1], t.numel()] for k, t in tensors.items()]}
    print(json.dumps(out), flush=True)
    sys.stdin.readline()


def best(fn: Any) -> tuple[float, Any]:
    fn()
    ts, res = [], None
    for _ in range(REPS):
        t0 = time.perf_counter()
        res = fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), res


def measure(variant: str, old_path: str, manifest_path: str) -> None:
    import torch

    from sidecar.contract.messages import CudaIpcHandle

    if variant == "before":
        spec = importlib.util.spec_from_file_location("mx_cuda_before", old_path)
        assert spec and spec.loader
        cm: Any = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cm)
    else:
        import sidecar.memory.cuda as cm
    m = json.loads(Path(manifest_path).read_text())
    handles = [CudaIpcHandle(u, bytes.fromhex(h), n) for u, h, n in m["handles"]]
    torch.zeros(1, device="cuda:0")
    cm.device_index_for_uuid(handles[0].device_uuid)
    ops = cm.CudaOps(0)
    ops.checksum_many([(torch.zeros(64, dtype=torch.uint8, device="cuda:0").data_ptr(), 64)])
    r: dict[str, Any] = {"variant": variant, "handles": len(handles)}

    times = []
    for _ in range(REPS + 1):
        t0 = time.perf_counter()
        regs = [cm.import_cuda_ipc(h) for h in handles]
        t1 = time.perf_counter()
        for g in regs:
            g.close()
        times.append((t1 - t0, time.perf_counter() - t1))
    r["import_s"] = min(t[0] for t in times[1:])
    r["close_s"] = min(t[1] for t in times[1:])
    regions = [cm.import_cuda_ipc(h) for h in handles]
    items = [(regions[hi].addr + off, n) for hi, off, n in m["entries"]]
    total = sum(n for _, n in items)
    r["bytes"] = total
    buf = ops.alloc(total)
    copies, off = [], 0
    for a, n in items:
        copies.append((buf.addr + off, a, n))
        off += n
    r["copy_all_s"], _ = best(lambda: ops.copy_many(copies))
    r["copy_all_gbps"] = total / r["copy_all_s"] / 1e9
    r["checksum_many_s"], sums = best(lambda: ops.checksum_many(items))
    r["checksum_per_tensor_s"], sums1 = best(lambda: [ops.checksum(a, n) for a, n in items])
    assert sums == sums1
    # Before the small copies below overwrite the staging buffer's start (measured: checked after them, every
    # variant reported the staged copy unequal).
    r["staged_checksums_equal"] = ops.checksum_many([(c[0], c[2]) for c in copies]) == sums
    small = [(buf.addr + 4096 * i, items[0][0] + 4096 * (i % 256), 4096) for i in range(20000)]
    r["copy_20k_small_s"], _ = best(lambda: ops.copy_many(small))
    r["checksums"] = sums
    d = cm.driver()
    # GIL: another thread runs while a stream sync waits for a long kernel
    x = torch.randn(8192, 8192, device="cuda:0")
    stream = torch.cuda.current_stream(0)
    for _ in range(20):
        x @ x
    ticks = [0]
    done = threading.Event()

    def spin() -> None:
        while not done.is_set():
            ticks[0] += 1

    th = threading.Thread(target=spin)
    th.start()
    t0 = time.perf_counter()
    with d.on(0):
        d.stream_sync(stream.cuda_stream)
    r["gil_probe"] = {"sync_s": time.perf_counter() - t0, "other_thread_ticks": ticks[0]}
    done.set()
    th.join()
    if variant == "after":
        probe: dict[str, Any] = {}
        with d.on(0):
            p1 = d.ipc_open(handles[0].handle)
            try:
                p2 = d.ipc_open(handles[0].handle)
                probe["second_open"] = "ok"
                probe["same_pointer"] = p1 == p2
                d.ipc_close(p1)
                try:
                    probe["other_valid_after_one_close"] = d.read(p2, 16) == d.read(items[0][0], 16)
                    probe["checksum_after_one_close"] = (cm.device_checksums([(p2, items[0][1])], 0)[0] == sums[0])
                except Exception as e:
                    probe["other_valid_after_one_close"] = f"error: {e}"
                d.ipc_close(p2)
                try:
                    d.read(p2, 16)
                    probe["read_after_both_closed"] = "ok (still mapped?)"
                except Exception as e:
                    probe["read_after_both_closed"] = f"error: {e}"
            except Exception as e:
                probe["second_open"] = f"error: {e}"
        r["refcount_probe"] = probe
        from cuda import bindings

        r["cuda_bindings"] = getattr(bindings, "__version__", "?")
    for g in regions:
        g.close()
    buf.close()
    print(json.dumps(r), flush=True)


def main() -> None:
    old = sys.argv[1]
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    eng = subprocess.Popen([sys.executable, __file__, "--engine"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, env=env)
    assert eng.stdout and eng.stdin
    line = eng.stdout.readline()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(line)
    runs: list[dict[str, Any]] = []
    for variant in ["before", "after", "before", "after"]:
        p = subprocess.run([sys.executable, __file__, "--measure", variant, old, f.name], capture_output=True,
                           text=True, timeout=300)
        if p.returncode:
            print(p.stdout, p.stderr, file=sys.stderr)
            runs.append({"variant": variant, "error": p.stderr[-3000:]})
            continue
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    eng.stdin.write("\n")
    eng.stdin.flush()
    eng.wait(30)
    keys = ["import_s", "close_s", "copy_all_s", "copy_all_gbps", "copy_20k_small_s", "checksum_many_s",
            "checksum_per_tensor_s"]
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    res: dict[str, Any] = {"device": smi,
                           "date": time.strftime("%Y-%m-%d", time.gmtime()), "handles": N_HANDLES, "reps": REPS}
    ok = [r for r in runs if "error" not in r]
    for v in ("before", "after"):
        rs = [r for r in ok if r["variant"] == v]
        if rs:
            res[v] = {k: (max if k.endswith("gbps") else min)(r[k] for r in rs) for k in keys}
            res[v]["bytes"] = rs[0]["bytes"]
            res[v]["gil_probe"] = rs[-1]["gil_probe"]
    if "before" in res and "after" in res:
        res["ratio_after_over_before"] = {k: res["after"][k] / res["before"][k] for k in keys}
        res["checksums_equal"] = len({json.dumps(r["checksums"]) for r in ok}) == 1 and all(
            r["staged_checksums_equal"] for r in ok)
    for r in ok:
        if "refcount_probe" in r:
            res["refcount_probe"] = r["refcount_probe"]
            res["cuda_bindings"] = r["cuda_bindings"]
    res["errors"] = [r for r in runs if "error" in r]
    txt = json.dumps(res, indent=1)
    print(txt)
    Path(os.environ.get("OUT", "."), "bindings_bench.json").write_text(txt)


if __name__ == "__main__":
    if sys.argv[1] == "--engine":
        engine()
    elif sys.argv[1] == "--measure":
        measure(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
