"""End-to-end GPU benchmark: our pipeline against the baselines of the same machine, in one run.

Engines are separate processes (sidecar.lab.toy_engine --devices): the source on GPU 0, the target on GPU 1
(GPU 0 for both on a one-GPU machine: a smoke test, not a figure to report). Sidecars are separate
`python -m sidecar run` daemons, Redis is a local valkey-server. Default model: Llama-shaped, bf16,
112 layers x 9 tensors + embeddings = 1013 tensors, ~9.7 GiB (MX_BENCH_CFG='{"hidden":..}' to change).

Figures, each measured here:
  peer      raw cudaMemcpyPeerAsync GPU0 -> GPU1 (CuPy), one 4 GiB block and the model's tensor sizes
  owned     NIXL READ between two processes that each registered memory they allocated (same sizes)
  pipeline  source sidecar (staging ring or direct) -> target sidecar READ into target engine memory,
            from the target sidecar's log (phase=transfer / receive) and metrics; ratio to peer
  ready     target engine: from building its tensors to release on verified weights (its own clock)
  disk      safetensors file on local disk -> GPU (safetensors.torch.load_file, cold and warm page cache),
            and the source engine's own load through the hook
  startup   target sidecar: NIXL agent creation, handle import, registration (metrics), for 1000+ tensors

Writes $OUT/bench.json and $OUT/bench.md; sidecar/engine logs to $OUT/bench_logs.txt (tails).
Usage: python tests/gpu/gpu_bench.py     (MX_BENCH_MODE=auto|staged|direct, default auto; MX_BENCH_STEPS=a,b to run
       only those steps: one GPU gets UCX TCP emulation, so `peer` and `owned` say nothing there)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

DEFAULT_CFG = {"hidden": 2048, "intermediate": 5632, "layers": 112, "vocab": 32000, "kv_heads_ratio": 4}
GB = 1e9


def log(*a: Any) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}]", *a, flush=True)


def sizes_of(cfg: dict[str, int]) -> list[int]:
    from sidecar.lab.toy_engine import layout

    out = []
    for shape in layout(cfg, 1, 0).values():
        n = 2
        for d in shape:
            n *= d
        out.append(n)
    return out


# ------------------------------------------------------------------------------------------ helpers run as
# subprocesses (each frees its GPU memory on exit)


def sub_checkpoint(path: str, cfg_json: str) -> dict[str, Any]:
    """Random bf16 weights generated on the GPU, saved as model.safetensors + config.json (toy_engine format)."""
    import torch
    from safetensors.torch import save_file

    from sidecar.lab.toy_engine import layout

    cfg = json.loads(cfg_json)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda:0").manual_seed(0)
    t0 = time.perf_counter()
    tensors = {}
    for name, shape in layout(cfg, 1, None).items():
        t = torch.randn(shape, generator=g, device="cuda:0", dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        tensors[name] = t.cpu()
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_file(tensors, str(out / "model.safetensors"))
    os.sync()
    (out / "config.json").write_text(json.dumps({"mx_toy": cfg, "dtype": "bfloat16", "seed": 0}))
    return {"gen_s": gen_s, "save_s": time.perf_counter() - t0, "bytes": (out / "model.safetensors").stat().st_size,
            "tensors": len(tensors)}


def sub_peer(src: int, dst: int, sizes_json: str) -> dict[str, Any]:
    """cudaMemcpyPeerAsync, one block and per tensor; best of 3 after a warm-up."""
    import cupy
    import torch

    sizes = json.loads(sizes_json)
    total = sum(sizes)
    a = torch.empty(total, dtype=torch.uint8, device=f"cuda:{src}")
    b = torch.empty(total, dtype=torch.uint8, device=f"cuda:{dst}")
    a.fill_(7)
    torch.cuda.synchronize(src)
    rt = cupy.cuda.runtime
    # Without peer access cudaMemcpyPeer stages through the host (measured 38 GB/s on 2x H200 instead of ~395).
    for d, o in ((dst, src), (src, dst)):
        with cupy.cuda.Device(d):
            try:
                rt.deviceEnablePeerAccess(o)
            except cupy.cuda.runtime.CUDARuntimeError:
                pass  # already enabled
    with cupy.cuda.Device(dst):
        stream = cupy.cuda.Stream(non_blocking=True)

    def one_block(n: int) -> float:
        t0 = time.perf_counter()
        rt.memcpyPeerAsync(b.data_ptr(), dst, a.data_ptr(), src, n, stream.ptr)
        stream.synchronize()
        return n / (time.perf_counter() - t0) / GB

    def per_tensor() -> float:
        t0 = time.perf_counter()
        off = 0
        for n in sizes:
            rt.memcpyPeerAsync(b.data_ptr() + off, dst, a.data_ptr() + off, src, n, stream.ptr)
            off += n
        stream.synchronize()
        return total / (time.perf_counter() - t0) / GB

    block = min(total, 4 << 30)
    one_block(block)
    res = {"block_bytes": block, "block_gbps": max(one_block(block) for _ in range(3)),
           "tensors_gbps": max(per_tensor() for _ in range(3)), "tensors": len(sizes), "bytes": total}
    res["ok"] = bool(torch.equal(a[:1 << 20].to(f"cuda:{dst}"), b[:1 << 20]))
    return res


def sub_disk(path: str, dev: int, cold: bool) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from sidecar.lab.demo import evict_from_page_cache

    f = Path(path) / "model.safetensors"
    if cold:
        evict_from_page_cache(f)
    torch.cuda.init()
    torch.empty(1, device=f"cuda:{dev}")
    t0 = time.perf_counter()
    ts = load_file(str(f), device=f"cuda:{dev}")
    torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    n = sum(t.numel() * t.element_size() for t in ts.values())
    return {"s": dt, "gbps": n / dt / GB, "bytes": n, "cold": cold}


def run_sub(fn: str, *args: Any, timeout: float = 300) -> dict[str, Any]:
    r = subprocess.run([sys.executable, __file__, "_sub", fn, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
    if r.returncode != 0:
        raise RuntimeError(f"{fn} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------ NIXL owned baseline


def nixl_owned(src: int, dst: int, sizes: list[int]) -> dict[str, Any]:
    from ipc_nixl_check import Child

    a = Child("owned", {"device": src, "sizes": sizes, "agent": "OA"})
    try:
        sa = a.recv()
        b = Child("owned", {"device": dst, "sizes": sizes, "agent": "OB", "source": sa, "reps": 3})
        try:
            sb = b.recv()
        finally:
            b.p.wait(60)
        return {k: v for k, v in sb.items()} | {"src_agent_s": sa["agent_s"], "src_register_s": sa["register_s"]}
    finally:
        a.stop()


# ------------------------------------------------------------------------------------------ the pipeline


class Replica:
    """A toy engine on one GPU and its sidecar, as separate processes (like a pod)."""

    def __init__(self, name: str, ckpt: Path, redis_url: str, work: Path, device: int, env: dict[str, str]) -> None:
        from sidecar.lab.replica_procs import Proc

        self.address = f"ipc://{work}/{name}.sock"
        e = {**os.environ, "PYTHONUNBUFFERED": "1", "MX_ZMQ_ADDRESS": self.address, "MX_REDIS_URL": redis_url,
             "MX_METRICS_PORT": "0", "MX_METRICS_HOST": "127.0.0.1", "MX_TP_SIZE": "1", **env}
        args = ["--checkpoint", str(ckpt), "--tp", "1", "--model-id", "bench-gpu", "--revision", "r1",
                "--devices", f"cuda:{device}", "--sidecar-timeout", "300"]
        if os.environ.get("MX_BENCH_DIGESTS", "1") == "0":
            args.append("--no-digests")
        self.t_start = time.monotonic()
        self.engine = Proc(f"{name}-engine", [sys.executable, "-m", "sidecar.lab.toy_engine", *args], e, work)
        self.sidecar = Proc(f"{name}-sidecar", [sys.executable, "-m", "sidecar", "run"], e, work)

    def result(self, timeout: float) -> dict[str, Any]:
        m = self.engine.wait_for(r'^\{"rank": 0, .*', timeout)
        return json.loads(m.group(0))  # type: ignore[no-any-return]

    def metrics(self) -> str:
        port = int(self.sidecar.wait_for(r"metrics on http://[^:]+:(\d+)/metrics", 30).group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()  # type: ignore[no-any-return]

    def phases(self) -> list[str]:
        return [ln for ln in self.sidecar.lines if "phase=" in ln or "serving as" in ln or "WARN" in ln
                or "ERROR" in ln]

    def stop(self) -> None:
        self.sidecar.stop()
        self.engine.stop()


def metric(text: str, name: str, label: str = "") -> float | None:
    vals = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
            if ln.startswith(name) and label in ln and not ln.startswith("#")]
    return sum(vals) if vals else None


def pipeline(ckpt: Path, src: int, dst: int, work: Path) -> dict[str, Any]:
    from sidecar.lab.embedded_redis import EmbeddedRedis

    mode = os.environ.get("MX_BENCH_MODE", "auto")
    env = {"MX_SOURCE_MODE": mode, "MX_VERIFY": "checksum", "MX_LOG_LEVEL": "info", "UCX_PROTO_INFO": "y"}
    out: dict[str, Any] = {"mode": mode}
    with EmbeddedRedis() as redis:
        s = Replica("src", ckpt, redis.url, work, src, env)
        try:
            sres = s.result(600)
            s.sidecar.wait_for(r"serving as a source", 300)
            out["source_engine"] = {k: sres.get(k) for k in ("outcome", "seconds", "tensors", "bytes")}
            out["source_phases"] = s.phases()
            out["source_startup"] = {p: metric(s.metrics(), "mx_startup_seconds", f'phase="{p}"')
                                     for p in ("agents", "import", "register")}
            t = Replica("tgt", ckpt, redis.url, work, dst, env)
            try:
                tres = t.result(600)
                wall = time.monotonic() - t.t_start
                text = t.metrics()
                phases = t.phases()
                out["target_engine"] = {k: tres.get(k) for k in ("outcome", "seconds", "tensors", "bytes")}
                out["target_wall_to_ready_s"] = wall  # includes process start and the torch import
                out["target_phases"] = phases
                out["bytes_equal"] = bool(sres.get("digests")) and sres.get("digests") == tres.get("digests")
                joined = "\n".join(phases)
                tr = re.findall(r"phase=transfer ([\d.]+) GB in ([\d.]+)s", joined)
                if tr:
                    gb, sec = max((float(a), float(b)) for a, b in tr)
                    out["transfer_s"] = sec
                    out["transfer_gbps"] = gb / sec if sec else None
                st = re.findall(r"setup ([\d.]+)s, stream ([\d.]+) GB/s", joined)
                if st:
                    out["setup_s"], out["stream_gbps"] = float(st[-1][0]), float(st[-1][1])
                rc = re.findall(r"phase=receive ([\d.]+) GB in ([\d.]+)s", joined)
                if rc:
                    out["receive_s"] = float(rc[-1][1])
                    out["receive_gbps"] = float(rc[-1][0]) / float(rc[-1][1])
                vf = re.findall(r"phase=verify .*, ([\d.]+)s after the last byte", joined)
                out["verify_s"] = float(vf[-1]) if vf else None
                out["target_startup"] = {p: metric(text, "mx_startup_seconds", f'phase="{p}"')
                                         for p in ("agents", "import", "register")}
                out["sidecar_time_to_ready_s"] = metric(text, "mx_time_to_ready_seconds", 'role="target"')
                out["moved_bytes"] = metric(text, "mx_transfer_bytes_total", 'role="target"')
                out["logs"] = {"tgt-sidecar": t.sidecar.lines[-400:], "tgt-engine": t.engine.lines[-50:]}
            finally:
                t.stop()
        finally:
            out.setdefault("logs", {})
            out["logs"].update({"src-sidecar": s.sidecar.lines[-400:], "src-engine": s.engine.lines[-50:]})
            s.stop()
    return out


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    from sidecar.memory.cuda import driver

    out_dir = Path(os.environ.get("OUT", ".gpu-out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mx-gpubench-", dir=os.environ.get("MX_BENCH_DIR", "/tmp")))
    cfg = json.loads(os.environ["MX_BENCH_CFG"]) if os.environ.get("MX_BENCH_CFG") else dict(DEFAULT_CFG)
    n = driver().device_count()
    src, dst = 0, (1 if n > 1 else 0)
    sizes = sizes_of(cfg)
    rep: dict[str, Any] = {"cfg": cfg, "gpus": n, "src": src, "dst": dst, "tensors": len(sizes),
                           "bytes": sum(sizes), "one_gpu_smoke_test": n < 2}
    log(f"{n} GPUs; model {cfg}: {len(sizes)} tensors, {sum(sizes) / 2**30:.2f} GiB; work dir {work}")
    failures = []
    steps = [
        ("checkpoint", lambda: run_sub("checkpoint", work / "ckpt", json.dumps(cfg), timeout=600)),
        ("peer", lambda: run_sub("peer", src, dst, json.dumps(sizes))),
        ("owned", lambda: nixl_owned(src, dst, sizes)),
        ("disk_cold", lambda: run_sub("disk", work / "ckpt", dst, 1)),
        ("disk_warm", lambda: run_sub("disk", work / "ckpt", dst, 0)),
        ("pipeline", lambda: pipeline(work / "ckpt", src, dst, work)),
    ]
    only = [x for x in os.environ.get("MX_BENCH_STEPS", "").split(",") if x]  # e.g. "checkpoint,disk_cold,pipeline"
    for name, fn in steps:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            rep[name] = fn()
        except Exception as e:
            rep[name] = {"error": repr(e)[-3000:]}
            failures.append(name)
        log(f"{name} ({time.perf_counter() - t0:.1f}s):",
            json.dumps({k: v for k, v in rep[name].items() if k not in ("logs",)}, default=str)[:1500])
        if name == "checkpoint" and name in failures:
            break
    logs = rep.get("pipeline", {}).pop("logs", {})
    with open(out_dir / "bench_logs.txt", "w") as f:
        for k, lines in logs.items():
            f.write(f"===== {k}\n" + "\n".join(lines) + "\n")
    md = summary(rep)
    rep["failures"] = failures
    (out_dir / "bench.json").write_text(json.dumps(rep, indent=1, default=str))
    (out_dir / "bench.md").write_text(md)
    print(md)
    p = rep.get("pipeline", {})
    ok = not failures and p.get("bytes_equal") and (p.get("target_engine") or {}).get("outcome") == "received"
    log("RESULT", "ok" if ok else f"FAILED {failures or 'pipeline check'}")
    return 0 if ok else 1


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "n/a"


def summary(r: dict[str, Any]) -> str:
    p, peer, own = r.get("pipeline", {}), r.get("peer", {}), r.get("owned", {})
    own_best = max((x["GBps"] for x in own.get("reads", []) if x.get("state") == "DONE"), default=None)
    ceiling = peer.get("tensors_gbps")
    pipe = p.get("transfer_gbps")
    cold, warm = r.get("disk_cold", {}).get("s"), r.get("disk_warm", {}).get("s")
    ready = (p.get("target_engine") or {}).get("seconds")
    ts, ss = p.get("target_startup") or {}, p.get("source_startup") or {}
    lines = [
        f"## GPU benchmark {time.strftime('%Y-%m-%d')}: {r['gpus']} GPU(s), source cuda:{r['src']} -> target "
        f"cuda:{r['dst']}{' (ONE-GPU SMOKE TEST: not a figure)' if r.get('one_gpu_smoke_test') else ''}",
        "",
        f"Model: toy Llama layout {r['cfg']}, {r['tensors']} tensors, {r['bytes'] / 2**30:.2f} GiB bf16; "
        f"source mode {p.get('mode')}; checksums verified; engine bytes equal: {p.get('bytes_equal')}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| raw cudaMemcpyPeer, one {_f(peer.get('block_bytes', 0) / 2**30)} GiB block | "
        f"{_f(peer.get('block_gbps'))} GB/s |",
        f"| raw cudaMemcpyPeer, the model's tensors one by one | {_f(ceiling)} GB/s |",
        f"| NIXL READ, owner-registered on both sides ({own.get('descriptors', 'n/a')} descriptors) | "
        f"{_f(own_best)} GB/s |",
        f"| **our pipeline** (target sidecar, phase=transfer) | **{_f(pipe)} GB/s**, {_f(p.get('transfer_s'))} s |",
        f"| pipeline / raw peer copy | {_f(pipe / ceiling if pipe and ceiling else None)} |",
        f"| pipeline / NIXL owner-registered | {_f(pipe / own_best if pipe and own_best else None)} |",
        f"| of which session setup (Hello -> first READ) | {_f(p.get('setup_s'), '{:.3f}')} s |",
        f"| streaming rate after setup (READs through the staging ring) | {_f(p.get('stream_gbps'))} GB/s |",
        f"| streaming / raw peer copy (one block) | "
        f"{_f(p['stream_gbps'] / peer['block_gbps'] if p.get('stream_gbps') and peer.get('block_gbps') else None)} |",
        f"| receive incl. verification (phase=receive) | {_f(p.get('receive_gbps'))} GB/s, "
        f"{_f(p.get('receive_s'))} s; verify {_f(p.get('verify_s'))} s |",
        f"| target engine time-to-ready (tensors built -> released on verified weights) | {_f(ready)} s |",
        f"| target wall time incl. process start + torch import | {_f(p.get('target_wall_to_ready_s'))} s |",
        f"| safetensors on local disk -> GPU, cold page cache | {_f(cold)} s "
        f"({_f(r.get('disk_cold', {}).get('gbps'))} GB/s) |",
        f"| safetensors on local disk -> GPU, warm page cache | {_f(warm)} s "
        f"({_f(r.get('disk_warm', {}).get('gbps'))} GB/s) |",
        f"| source engine: load from storage through the hook | "
        f"{_f((p.get('source_engine') or {}).get('seconds'))} s |",
        f"| disk cold / target ready | {_f(cold / ready if cold and ready else None)}x |",
        f"| target sidecar start-up: agent creation / import / registration | {_f(ts.get('agents'))} / "
        f"{_f(ts.get('import'), '{:.3f}')} / {_f(ts.get('register'), '{:.3f}')} s |",
        f"| source sidecar start-up: agent creation / import / registration | {_f(ss.get('agents'))} / "
        f"{_f(ss.get('import'), '{:.3f}')} / {_f(ss.get('register'), '{:.3f}')} s |",
        f"| NIXL owned baseline: agent creation / registration | {_f(own.get('agent_s'))} / "
        f"{_f(own.get('register_s'), '{:.3f}')} s |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_sub":
        fn, args = sys.argv[2], sys.argv[3:]
        if fn == "checkpoint":
            res = sub_checkpoint(args[0], args[1])
        elif fn == "peer":
            res = sub_peer(int(args[0]), int(args[1]), args[2])
        elif fn == "disk":
            res = sub_disk(args[0], int(args[1]), args[2] == "1")
        else:
            raise SystemExit(f"unknown helper {fn}")
        print(json.dumps(res))
        sys.exit(0)
    sys.exit(main())
