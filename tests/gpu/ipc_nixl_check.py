"""GPU check: CUDA IPC export/import across processes, staging + NIXL READ between two sidecars, checksums.

  engine E1 (source engine, GPU 0)   --CUDA IPC-->  sidecar A: read back byte-exact, stage into its own
                                                    buffer (CudaOps.copy_many), register it with NIXL
  engine E2 (target engine, GPU 1|0) --CUDA IPC-->  sidecar B: register imported memory, READ from A
Then: B's device checksums == A's, E2's own bytes == E1's bytes (xxh3 per tensor in the engines), and an
engine under expandable_segments:True is refused. Writes $OUT/ipc_nixl.json; exit status 0 only if all pass.

Usage: python tests/gpu/ipc_nixl_check.py [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from gpu_procs import Channel, layout  # noqa: E402


class Child:
    def __init__(self, role: str, params: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.role = role
        self.p = subprocess.Popen([sys.executable, os.path.join(HERE, "gpu_procs.py"), role],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
        assert self.p.stdin and self.p.stdout
        self.ch = Channel(self.p.stdout.fileno(), self.p.stdin.fileno())
        self.ch.send(params)

    def recv(self) -> Any:
        msg = self.ch.recv()
        if isinstance(msg, dict) and "error" in msg and len(msg) == 1:
            raise RuntimeError(f"{self.role} failed:\n{msg['error']}")
        return msg

    def stop(self) -> None:
        try:
            if self.p.poll() is None:
                self.ch.send({"cmd": "exit"})
                self.ch.recv()
        except Exception:
            pass
        try:
            self.p.wait(20)
        except subprocess.TimeoutExpired:
            self.p.kill()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    from sidecar.memory.cuda import device_uuids, driver

    n = driver().device_count()
    src_dev, dst_dev = 0, (1 if n > 1 else 0)
    res: dict[str, Any] = {"gpus": n, "uuids": device_uuids(), "src_dev": src_dev, "dst_dev": dst_dev}
    spec = layout(args.layers)
    kids: list[Child] = []
    ok = True
    try:
        t0 = time.perf_counter()
        e1 = Child("engine", {"device": src_dev, "fill": "random", "seed": 7, "layout": spec})
        e2 = Child("engine", {"device": dst_dev, "fill": "zeros", "layout": spec})
        vmm = Child("vmm", {"device": src_dev}, env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
        kids += [e1, e2, vmm]
        m1, m2 = e1.recv(), e2.recv()
        res["engine"] = {k: m1[k] for k in ("build_s", "export_s", "bytes", "torch_uuid")}
        res["engine"]["tensors"] = len(m1["entries"])
        res["engine"]["handles"] = len(m1["handles"])
        res["engine"]["handle_uuid"] = m1["handles"][0][0]
        res["uuid_matches_torch"] = m1["handles"][0][0].lower().removeprefix("gpu-") == m1["torch_uuid"].lower(
            ).removeprefix("gpu-")
        res["vmm"] = vmm.recv()
        ok &= res["vmm"]["refused"] and "expandable_segments" in res["vmm"]["error"]
        ok &= res["engine"]["handles"] < res["engine"]["tensors"] and res["uuid_matches_torch"]
        # Which conditions let UCX register imported memory (run 1 on H100: NIXL_ERR_BACKEND, "VRAM memory is
        # detected as host by UCX", with the agent created before the import)
        cases = [dict(agent_first=af, set_device=sd, cache=c) for af, sd, c in
                 [(True, True, ""), (False, True, ""), (True, True, "n"), (False, False, ""), (True, False, "n")]]
        probes = [Child("regprobe", {"manifest": m1, "agent": f"P{i}", "case": c},
                        env={"UCX_MEMTYPE_CACHE": c["cache"]} if c["cache"] else None) for i, c in enumerate(cases)]
        kids += probes
        res["regprobe"] = [pr.recv() for pr in probes]
        sidecar_env = {"UCX_PROTO_INFO": "y", "UCX_MEMTYPE_CACHE": os.environ.get("MX_CHECK_MEMTYPE_CACHE", "n")}
        a = Child("source", {"manifest": m1, "agent": "A"}, env=sidecar_env)
        kids.append(a)
        sa = a.recv()
        res["source"] = {k: v for k, v in sa.items() if k not in ("meta", "descs", "staging_checksums")}
        ok &= not sa["readback_mismatches"] and not sa["checksum_mismatches"]
        b = Child("target", {"manifest": m2, "source": sa, "agent": "B", "reps": 3}, env=sidecar_env)
        kids.append(b)
        sb = b.recv()
        res["target"] = sb
        ok &= all(r["state"] == "DONE" for r in sb["reads"]) and not sb["checksum_mismatches"]
        e2.ch.send({"cmd": "digests"})
        d2 = e2.recv()["digests"]
        wrong = [k for k in m1["digests"] if m1["digests"][k] != d2[k]]
        res["engine_bytes_equal"] = not wrong
        res["engine_mismatches"] = wrong[:10]
        ok &= not wrong
        res["wall_s"] = time.perf_counter() - t0
    except Exception as e:
        res["error"] = repr(e)
        ok = False
        print(e, file=sys.stderr)
    finally:
        for k in reversed(kids):
            k.stop()
    res["ok"] = bool(ok)
    text = json.dumps(res, indent=1, default=str)
    print(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "ipc_nixl.json"), "w") as f:
            f.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
