"""Engine and sidecar stand-in processes for the GPU checks (`python tests/gpu/gpu_procs.py ROLE`).

Each process reads length-prefixed msgpack frames on stdin and writes them on its original stdout;
fd 1 is redirected to stderr so library chatter (UCX_PROTO_INFO, NIXL logs) cannot corrupt the frames.
No pickle anywhere: NIXL descriptors travel as (addr, len, devid) triples and are built locally.

Roles:
  engine    : allocates a seeded, Llama-like layout on one GPU (random or zero bytes), exports it with
              runtime_hooks.cuda_ipc, answers {"cmd": "digests"} and {"cmd": "exit"}.
  vmm       : as engine, under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; reports the refusal.
  source    : sidecar A: imports an engine's handles by UUID, reads them back, stages them into its own
              buffer with CudaOps.copy_many, registers that buffer with NIXL, serves READs.
  target    : sidecar B: imports the other engine's handles, registers them (imported memory as the
              local side), READs every tensor from A's buffer, checksums on the device.
"""

from __future__ import annotations

import os
import select
import struct
import sys
import time
from typing import Any

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import msgpack

# ------------------------------------------------------------------------------------------ framing


class Channel:
    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd

    @classmethod
    def child(cls) -> Channel:
        wfd = os.dup(1)
        os.dup2(2, 1)  # anything printed to stdout from now on (UCX, NIXL) goes to stderr
        return cls(0, wfd)

    def send(self, obj: Any) -> None:
        data = msgpack.packb(obj, use_bin_type=True)
        buf = struct.pack(">Q", len(data)) + data
        view = memoryview(buf)
        while view:
            n = os.write(self.wfd, view)
            view = view[n:]

    def _read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = os.read(self.rfd, n - len(out))
            if not chunk:
                raise EOFError("peer closed the channel")
            out += chunk
        return bytes(out)

    def recv(self, idle: Any = None, timeout: float | None = None) -> Any:
        """Next frame; `idle()` runs while waiting (NIXL progress), every millisecond."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while idle is not None:
            r, _, _ = select.select([self.rfd], [], [], 0.001)
            if r:
                break
            idle()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("no frame in time")
        (n,) = struct.unpack(">Q", self._read(8))
        return msgpack.unpackb(self._read(n), raw=False)


def log(*a: Any) -> None:
    print(f"[{os.environ.get('MX_GPU_ROLE', '?')} {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ layout


def layout(layers: int, hidden: int = 2048, kv: int = 512, inter: int = 5632, vocab: int = 32000
           ) -> list[tuple[str, str, list[int], str]]:
    """(name, dtype, shape, storage group) in allocation order. Tensors of one group are contiguous views of
    one storage (fused qkv), odd sizes, 0-dim scalars and zero-byte tensors are included on purpose."""
    out: list[tuple[str, str, list[int], str]] = [
        ("model.embed_tokens.weight", "bfloat16", [vocab, hidden], ""),
        ("model.rotary_emb.inv_freq", "float32", [32], ""),
        ("model.tiny.u8_1", "uint8", [1], ""),
        ("model.tiny.u8_3", "uint8", [3], ""),
        ("model.tiny.i8_1023", "int8", [1023], ""),
        ("model.empty_scales", "bfloat16", [0], ""),
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", "bfloat16", [hidden], ""),
            (p + "self_attn.q_proj.weight", "bfloat16", [hidden, hidden], f"qkv{i}"),
            (p + "self_attn.k_proj.weight", "bfloat16", [kv, hidden], f"qkv{i}"),
            (p + "self_attn.v_proj.weight", "bfloat16", [kv, hidden], f"qkv{i}"),
            (p + "self_attn.o_proj.weight", "bfloat16", [hidden, hidden], ""),
            (p + "self_attn.scale", "float32", [], ""),
            (p + "post_attention_layernorm.weight", "bfloat16", [hidden], ""),
            (p + "mlp.gate_up_proj.weight", "bfloat16", [2 * inter, hidden], ""),
            (p + "mlp.down_proj.weight", "bfloat16", [hidden, inter], ""),
            (p + "mlp.down_proj.input_scale", "float32", [1], ""),
            (p + "mlp.odd_bias", "float16", [17], ""),
            (p + "mlp.empty", "bfloat16", [0, hidden], ""),
        ]
    out += [("model.norm.weight", "bfloat16", [hidden], ""), ("lm_head.weight", "bfloat16", [vocab, hidden], "")]
    return out


def build_tensors(spec: list[tuple[str, str, list[int], str]], device: int, fill: str, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator(device=f"cuda:{device}").manual_seed(seed)

    def numel(shape: list[int]) -> int:
        n = 1
        for d in shape:
            n *= d
        return n

    def raw(nbytes: int) -> torch.Tensor:
        if fill == "zeros":
            return torch.zeros(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
        return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=f"cuda:{device}", generator=g)

    out: dict[str, torch.Tensor] = {}
    groups: dict[str, list[tuple[str, str, list[int]]]] = {}
    for name, dt, shape, group in spec:
        if group:
            if group not in groups:
                groups[group] = []
            groups[group].append((name, dt, shape))
            continue
        dtype = getattr(torch, dt)
        nb = numel(shape) * dtype.itemsize
        out[name] = raw(nb).view(dtype).reshape(shape)
    for members in groups.values():
        sizes = [numel(s) * getattr(torch, dt).itemsize for _, dt, s in members]
        buf = raw(sum(sizes))
        off = 0
        for (name, dt, shape), nb in zip(members, sizes, strict=True):
            out[name] = buf[off:off + nb].view(getattr(torch, dt)).reshape(shape)
            off += nb
    torch.cuda.synchronize(device)
    return out


def span(t: Any) -> int:
    from runtime_hooks.cuda_ipc import _span_bytes

    return _span_bytes(t)


def digest(t: Any) -> str:
    import torch
    import xxhash

    if t.numel() == 0:
        return xxhash.xxh3_64_hexdigest(b"")
    return xxhash.xxh3_64_hexdigest(t.reshape(-1).view(torch.uint8).cpu().numpy().data)


def digest_raw(addr: int, nbytes: int, dev: int) -> str:
    import xxhash

    from sidecar.memory.cuda import wrap_bytes

    if nbytes == 0:
        return xxhash.xxh3_64_hexdigest(b"")
    return xxhash.xxh3_64_hexdigest(wrap_bytes(addr, nbytes, dev).cpu().numpy().data)


# ------------------------------------------------------------------------------------------ roles


def role_engine(ch: Channel, p: dict[str, Any]) -> None:
    import torch

    from runtime_hooks.cuda_ipc import export_cuda_tensors
    from sidecar.memory.cuda import device_checksum

    dev = p["device"]
    torch.cuda.set_device(dev)
    spec = [tuple(x) for x in p["layout"]] if "layout" in p else layout(p.get("layers", 4))
    t0 = time.perf_counter()
    tensors = build_tensors(spec, dev, p.get("fill", "random"), p.get("seed", 7))  # type: ignore[arg-type]
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    handles, where = export_cuda_tensors(tensors)
    export_s = time.perf_counter() - t0
    entries = [[name, where[name][0], where[name][1], span(t)] for name, t in tensors.items()]
    reply: dict[str, Any] = {
        "pid": os.getpid(),
        "device": dev,
        "torch_uuid": str(torch.cuda.get_device_properties(dev).uuid),
        "handles": [[h.device_uuid, h.handle, h.nbytes] for h in handles],
        "entries": entries,
        "build_s": build_s,
        "export_s": export_s,
        "bytes": sum(e[3] for e in entries),
    }
    if p.get("digests", True):
        reply["digests"] = {n: digest(t) for n, t in tensors.items()}
        reply["checksums"] = {n: device_checksum(t.data_ptr(), span(t), dev) for n, t in tensors.items()}
    ch.send(reply)
    while True:
        cmd = ch.recv()
        if cmd["cmd"] == "digests":
            torch.cuda.synchronize(dev)
            ch.send({"digests": {n: digest(t) for n, t in tensors.items()}})
        elif cmd["cmd"] == "exit":
            ch.send({"bye": True})
            return


def role_vmm(ch: Channel, p: dict[str, Any]) -> None:
    import torch

    from runtime_hooks.cuda_ipc import UnsupportedCudaMemory, export_cuda_tensors

    torch.cuda.set_device(p["device"])
    t = torch.ones(1 << 20, device=f"cuda:{p['device']}")
    try:
        export_cuda_tensors({"w": t})
        ch.send({"refused": False, "error": ""})
    except UnsupportedCudaMemory as e:
        ch.send({"refused": True, "error": str(e)})


def _agent(name: str) -> Any:
    from sidecar.transport import _nixl_api

    api = _nixl_api()
    return api.nixl_agent(name, api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))


def _import(manifest: dict[str, Any]) -> tuple[list[Any], list[int], list[int], float]:
    """Regions for the engine's handles; per entry: absolute address and device."""
    from sidecar.contract.messages import CudaIpcHandle
    from sidecar.memory.cuda import import_cuda_ipc

    t0 = time.perf_counter()
    regions = [import_cuda_ipc(CudaIpcHandle(u, h, n)) for u, h, n in manifest["handles"]]
    import_s = time.perf_counter() - t0
    addrs, devs = [], []
    for _name, hidx, off, nb in manifest["entries"]:
        if nb == 0:
            addrs.append(0)
            devs.append(-1)
            continue
        r = regions[hidx]
        if off + nb > r.nbytes:
            raise ValueError("entry outside its region")
        addrs.append(r.addr + off)
        devs.append(r.device_id)
    return regions, addrs, devs, import_s


def role_source(ch: Channel, p: dict[str, Any]) -> None:
    import numpy as np

    from sidecar.memory.cuda import CudaOps, device_index_for_uuid

    m = p["manifest"]
    out: dict[str, Any] = {}
    # the daemon's order: import the handles, then create the agent
    regions, addrs, _devs, out["import_s"] = _import(m)
    t0 = time.perf_counter()
    ag = _agent(p.get("agent", "A"))
    out["agent_s"] = time.perf_counter() - t0
    dev = device_index_for_uuid(m["handles"][0][0])
    ops = CudaOps(dev)
    entries = m["entries"]
    if p.get("verify", True):
        # (a) byte-exact read-back through the imported mapping, and the device checksum both ways
        bad = [e[0] for e, a in zip(entries, addrs, strict=True) if digest_raw(a, e[3], dev) != m["digests"][e[0]]]
        t0 = time.perf_counter()
        sums = [ops.checksum(a, e[3]) for e, a in zip(entries, addrs, strict=True)]
        out["checksum_s"] = time.perf_counter() - t0
        out["readback_mismatches"] = bad
        out["checksum_mismatches"] = [e[0] for e, s in zip(entries, sums, strict=True) if s != m["checksums"][e[0]]]
    # staging buffer owned by this process, 256-byte aligned slots per tensor
    offs, total = [], 0
    for e in entries:
        offs.append(total)
        total += (e[3] + 255) // 256 * 256
    buf = ops.alloc(total)
    copies = [(buf.addr + o, a, e[3]) for e, a, o in zip(entries, addrs, offs, strict=True) if e[3]]
    ops.copy_many(copies)  # warm-up (stream creation, first-touch)
    t0 = time.perf_counter()
    ops.copy_many(copies)
    dt = time.perf_counter() - t0
    out["stage_copy_s"] = dt
    out["stage_copy_gbps"] = sum(c[2] for c in copies) / dt / 1e9
    t0 = time.perf_counter()
    ag.register_memory(np.array([(buf.addr, total, dev)], dtype=np.uint64), "VRAM")
    out["register_staging_s"] = time.perf_counter() - t0
    out["descs"] = [[buf.addr + o, e[3], dev] for e, o in zip(entries, offs, strict=True)]
    if p.get("verify", True):
        out["staging_checksums"] = [ops.checksum(buf.addr + o, e[3]) for e, o in zip(entries, offs, strict=True)]
    if p.get("direct_probe", True):
        # imported engine memory registered as a NIXL *source*: expected to fall back to host emulation
        big = max(regions, key=lambda r: r.nbytes)
        t0 = time.perf_counter()
        ag.register_memory(np.array([(r.addr, r.nbytes, r.device_id) for r in regions], dtype=np.uint64), "VRAM")
        out["register_imported_s"] = time.perf_counter() - t0
        out["direct_desc"] = [big.addr, min(big.nbytes, 64 << 20), dev]
    out["meta"] = bytes(ag.get_agent_metadata())  # after every registration: the peer sees only these
    out["device"] = dev
    out["handles"] = len(regions)
    ch.send(out)
    while True:  # serve: drive UCX progress while the target reads (needed by the emulated path)
        cmd = ch.recv(idle=ag.get_new_notifs)
        if cmd["cmd"] == "exit":
            for r in regions:
                r.close()
            buf.close()
            ch.send({"bye": True})
            return


def _read(ag: Any, local: Any, remote: Any, peer: str, limit_s: float) -> tuple[str, float]:
    lo = ag.get_xfer_descs(local, "VRAM")
    re = ag.get_xfer_descs(remote, "VRAM")
    h = ag.initialize_xfer("READ", lo, re, peer, b"")
    t0 = time.perf_counter()
    st = ag.transfer(h)
    while st == "PROC" and time.perf_counter() - t0 < limit_s:
        st = ag.check_xfer_state(h)
    dt = time.perf_counter() - t0
    if st == "DONE":
        ag.release_xfer_handle(h)
    return st, dt


def role_target(ch: Channel, p: dict[str, Any]) -> None:
    import numpy as np

    from sidecar.memory.cuda import CudaOps, device_index_for_uuid

    m, src = p["manifest"], p["source"]
    out: dict[str, Any] = {}
    regions, addrs, _devs, out["import_s"] = _import(m)
    t0 = time.perf_counter()
    ag = _agent(p.get("agent", "B"))
    out["agent_s"] = time.perf_counter() - t0
    dev = device_index_for_uuid(m["handles"][0][0])
    ops = CudaOps(dev)
    t0 = time.perf_counter()
    ag.register_memory(np.array([(r.addr, r.nbytes, r.device_id) for r in regions], dtype=np.uint64), "VRAM")
    out["register_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer = ag.add_remote_agent(src["meta"])
    peer = peer.decode() if isinstance(peer, bytes) else peer
    out["add_remote_s"] = time.perf_counter() - t0
    entries = m["entries"]
    keep = [i for i, e in enumerate(entries) if e[3] > 0]
    local = np.array([(addrs[i], entries[i][3], dev) for i in keep], dtype=np.uint64)
    remote = np.array([tuple(src["descs"][i]) for i in keep], dtype=np.uint64)
    nbytes = int(local[:, 1].sum())
    runs = []
    for _ in range(p.get("reps", 3)):
        st, dt = _read(ag, local, remote, peer, 60.0)
        runs.append({"state": st, "s": round(dt, 4), "GBps": round(nbytes / dt / 1e9, 2)})
        if st != "DONE":
            break
    out["reads"] = runs
    out["bytes"] = nbytes
    out["descriptors"] = len(keep)
    if p.get("verify", True) and "staging_checksums" in src:
        t0 = time.perf_counter()
        sums = [ops.checksum(addrs[i], entries[i][3]) for i in range(len(entries))]
        out["checksum_s"] = time.perf_counter() - t0
        want = src["staging_checksums"]
        out["checksum_mismatches"] = [entries[i][0] for i in range(len(entries)) if sums[i] != want[i]]
    if "direct_desc" in src:
        a, n, d = src["direct_desc"]
        try:
            scratch = ops.alloc(n)
            ag.register_memory(np.array([(scratch.addr, n, dev)], dtype=np.uint64), "VRAM")
            st, dt = _read(ag, np.array([(scratch.addr, n, dev)], dtype=np.uint64),
                           np.array([(a, n, d)], dtype=np.uint64), peer, 30.0)
            out["direct_imported_source"] = {"state": st, "s": round(dt, 4), "GBps": round(n / dt / 1e9, 3),
                                             "bytes": n}
        except Exception as e:
            out["direct_imported_source"] = {"error": repr(e)}
    ch.send(out)
    cmd = ch.recv()
    if cmd["cmd"] == "exit":
        ag.remove_remote_agent(peer)
        for r in regions:
            r.close()
        ch.send({"bye": True})


def role_owned(ch: Channel, p: dict[str, Any]) -> None:
    """NIXL baseline: memory registered by the process that allocated it, on both sides.

    Without "source": allocate one buffer holding `sizes` (256-byte aligned), fill it, register, publish.
    With "source": allocate the same layout, register, READ every piece from the source (reps times).
    """
    import numpy as np
    import torch

    from sidecar.memory.cuda import CudaOps, wrap_bytes

    dev = p["device"]
    torch.cuda.set_device(dev)
    ops = CudaOps(dev)
    sizes = [int(n) for n in p["sizes"] if n > 0]
    offs, total = [], 0
    for n in sizes:
        offs.append(total)
        total += (n + 255) // 256 * 256
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    ag = _agent(p["agent"])
    out["agent_s"] = time.perf_counter() - t0
    buf = ops.alloc(total)
    wrap_bytes(buf.addr, total, dev).fill_(0 if "source" in p else 0x5A)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    ag.register_memory(np.array([(buf.addr, total, dev)], dtype=np.uint64), "VRAM")
    out["register_s"] = time.perf_counter() - t0
    descs = [[buf.addr + o, n, dev] for o, n in zip(offs, sizes, strict=True)]
    if "source" not in p:
        out["meta"] = bytes(ag.get_agent_metadata())
        out["descs"] = descs
        ch.send(out)
        ch.recv(idle=ag.get_new_notifs)
        buf.close()
        ch.send({"bye": True})
        return
    src = p["source"]
    peer = ag.add_remote_agent(src["meta"])
    peer = peer.decode() if isinstance(peer, bytes) else peer
    local = np.array([tuple(d) for d in descs], dtype=np.uint64)
    remote = np.array([tuple(d) for d in src["descs"]], dtype=np.uint64)
    nbytes = sum(sizes)
    runs = []
    for _ in range(p.get("reps", 3)):
        st, dt = _read(ag, local, remote, peer, 120.0)
        runs.append({"state": st, "s": round(dt, 4), "GBps": round(nbytes / dt / 1e9, 2)})
        if st != "DONE":
            break
    out["reads"] = runs
    out["bytes"] = nbytes
    out["descriptors"] = len(sizes)
    out["filled_ok"] = bool((wrap_bytes(buf.addr, total, dev)[:sizes[0]] == 0x5A).all().item())
    ag.remove_remote_agent(peer)
    buf.close()
    ch.send(out)


def role_regprobe(ch: Channel, p: dict[str, Any]) -> None:
    """Can NIXL/UCX register CUDA-IPC-imported memory? Depends on order (agent before import), on
    UCX_MEMTYPE_CACHE and on a current CUDA context; each combination runs in its own process."""
    import numpy as np

    out: dict[str, Any] = {"env_memtype_cache": os.environ.get("UCX_MEMTYPE_CACHE", "(default)"), **p["case"]}
    if p["case"]["set_device"]:
        import torch

        from sidecar.memory.cuda import device_index_for_uuid

        torch.cuda.set_device(device_index_for_uuid(p["manifest"]["handles"][0][0]))
        torch.cuda.synchronize()
    ag = _agent(p["agent"]) if p["case"]["agent_first"] else None
    regions, _addrs, _devs, _ = _import(p["manifest"])
    if ag is None:
        ag = _agent(p["agent"])
    try:
        ag.register_memory(np.array([(r.addr, r.nbytes, r.device_id) for r in regions], dtype=np.uint64), "VRAM")
        out["registered"] = True
    except Exception as e:
        out["registered"] = False
        out["error"] = repr(e)
    for r in regions:
        r.close()
    ch.send(out)


ROLES = {"engine": role_engine, "vmm": role_vmm, "source": role_source, "target": role_target,
         "owned": role_owned, "regprobe": role_regprobe}


def main() -> None:
    role = sys.argv[1]
    os.environ["MX_GPU_ROLE"] = role
    ch = Channel.child()
    params = ch.recv()
    try:
        ROLES[role](ch, params)
    except Exception:
        import traceback

        tb = traceback.format_exc()
        log(tb)
        ch.send({"error": tb})
        sys.exit(1)


if __name__ == "__main__":
    main()
