"""A stand-in engine process for the demo, tests and benchmarks: a Llama-shaped set of tensors per TP rank.

`python -m sidecar.lab.toy_engine --checkpoint DIR --tp 2` builds empty (uninitialised) tensors for
every rank with Megatron sharding, starts one RankHook per rank, blocks each rank until the sidecar's
verdict, prints one JSON line per rank ({"rank", "outcome", "digests", "tensors", "bytes", "seconds"}, the
seconds from building the tensors to the release), and then keeps serving until SIGTERM.
`make_checkpoint` writes the matching full safetensors checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import xxhash

from runtime_hooks.derived_state import number_text
from runtime_hooks.engines.torch_module import TorchModuleAdapter
from runtime_hooks.exposure import ModelIdentity
from runtime_hooks.hook import RankHook

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

SMALL = {"hidden": 256, "intermediate": 688, "layers": 2, "vocab": 1024, "kv_heads_ratio": 1}
DEMO = {"hidden": 1024, "intermediate": 2816, "layers": 8, "vocab": 32000, "kv_heads_ratio": 1}


def layout(cfg: dict[str, int], tp: int, rank: int | None) -> dict[str, list[int]]:
    """Shapes of every tensor; rank=None gives the full (unsharded) checkpoint shapes."""
    h, i, v = cfg["hidden"], cfg["intermediate"], cfg["vocab"]
    kv = h // cfg["kv_heads_ratio"]
    d = 1 if rank is None else tp

    def col(out: int, inp: int) -> list[int]:
        return [out // d, inp]

    def row(out: int, inp: int) -> list[int]:
        return [out, inp // d]

    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": col(v, h)}
    for n in range(cfg["layers"]):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = [h]
        shapes[p + "self_attn.q_proj.weight"] = col(h, h)
        shapes[p + "self_attn.k_proj.weight"] = col(kv, h)
        shapes[p + "self_attn.v_proj.weight"] = col(kv, h)
        shapes[p + "self_attn.o_proj.weight"] = row(h, h)
        shapes[p + "post_attention_layernorm.weight"] = [h]
        shapes[p + "mlp.gate_proj.weight"] = col(i, h)
        shapes[p + "mlp.up_proj.weight"] = col(i, h)
        shapes[p + "mlp.down_proj.weight"] = row(h, i)
    shapes["model.norm.weight"] = [h]
    shapes["lm_head.weight"] = col(v, h)
    return shapes


def make_checkpoint(path: str | os.PathLike[str], cfg: dict[str, int], dtype: str = "bfloat16",
                    seed: int = 0) -> int:
    """Seeded random weights, saved as one full safetensors file + config.json. Returns bytes written."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.randn(shape, generator=g) * 0.02).to(DTYPES[dtype])
               for name, shape in layout(cfg, 1, None).items()}
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"mx_toy": cfg, "dtype": dtype, "seed": seed}))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def rank_tensors(cfg: dict[str, int], tp: int, rank: int, dtype: torch.dtype,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    ts = {name: torch.empty(shape, dtype=dtype, device=device) for name, shape in layout(cfg, tp, rank).items()}
    # Engine state that is not a checkpoint weight: a derived buffer and a zero-byte tensor, as real engines hold.
    head_dim = 64
    pos = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    ts["model.rotary_emb.inv_freq"] = 1.0 / (10000 ** (pos / head_dim))
    ts["model.empty_scales"] = torch.empty(0, dtype=dtype, device=device)
    return ts


class ToyAdapter(TorchModuleAdapter):
    """Derived buffers are recomputed, not read: they are not in the checkpoint.

    `prepare_delay` stands in for a large model's slow dummy init + post-processing; `prepared` counts how often
    post-processing ran (vLLM's is not idempotent: it must run once per engine life)."""

    prepare_delay = 0.0
    prepare_realloc = 0  # tensors that post-processing moves to new memory (as a repacking engine does)
    load_delay = 0.0
    prepared = 0
    # A number post-processing derives from the weights into no tensor (as vLLM's fp8 KV scales are), and a fault
    # knob: `stale_derived` keeps a target's dummy-derived value after the receive (the bug the guard catches).
    norm_scale = 0.0
    stale_derived = False

    def _derive(self) -> None:
        self.norm_scale = float(self.discover_tensors()["model.norm.weight"].float().abs().sum())

    def derived_state(self) -> dict[str, str]:
        return {"model.norm.scale": number_text(self.norm_scale)}

    def after_receive(self) -> None:
        if not self.stale_derived:
            self._derive()

    rebuild_on_retry = False  # vLLM's reset_for_retry builds a fresh model: new memory, the old is let go

    def reset_for_retry(self) -> None:
        if self.rebuild_on_retry:
            source = self._source
            assert isinstance(source, dict)
            for name in sorted(source):
                source[name] = torch.empty_like(source[name])  # the old storage is dropped here, one at a time

    def prepare_target(self) -> None:
        time.sleep(self.prepare_delay)
        source = self._source
        assert isinstance(source, dict)  # the toy engine's tensors are a dict; new tensors replace entries
        for name in sorted(source)[: self.prepare_realloc]:
            old = source[name]
            source[name] = torch.full_like(old, 7) if old.is_floating_point() else torch.zeros_like(old)
        self._derive()  # from whatever the uninitialised tensors hold
        self.prepared += 1

    load_delay = 0.0  # seconds a storage load takes on top of the read (a slow bucket, for tests)
    load_gate = ""  # a storage load waits for this file to exist (benchmarks: targets lined up first)

    def load_from_storage(self) -> None:
        time.sleep(self.load_delay)
        while self.load_gate and not os.path.exists(self.load_gate):
            time.sleep(0.05)
        tensors = self.discover_tensors()
        derived = {k: tensors.pop(k) for k in ("model.rotary_emb.inv_freq", "model.empty_scales")}
        TorchModuleAdapter(tensors, self.identity(), self._dir).load_from_storage()
        del derived  # already computed at construction
        self._derive()


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Per-tensor xxh3 of the bytes, computed in the engine process (independent of the sidecar's checksums)."""
    out = {}
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        out[name] = xxhash.xxh3_64_hexdigest(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--model-id", default="toy-llama")
    p.add_argument("--revision", default="r1")
    p.add_argument("--address", default=None, help="default: MX_ZMQ_ADDRESS")
    p.add_argument("--sidecar-timeout", type=float, default=None)
    p.add_argument("--exit-after-ready", action="store_true")
    p.add_argument("--devices", default="cpu", help="comma-separated device per rank, e.g. cuda:0,cuda:1")
    p.add_argument("--no-digests", action="store_true", help="skip the per-tensor digests (large GPU models)")
    p.add_argument("--prepare-delay", type=float, default=0.0, help="seconds of (simulated) post-processing")
    p.add_argument("--load-delay", type=float, default=0.0, help="seconds added to each storage load")
    p.add_argument("--load-gate", default="", help="a storage load waits until this file exists")
    p.add_argument("--stale-derived", action="store_true",
                   help="a target keeps its dummy-derived number after the receive (a fault for tests)")
    p.add_argument("--prepare-realloc", type=int, default=0,
                   help="tensors that prepare_target moves to new memory (their old handles go stale)")
    p.add_argument("--rebuild-on-retry", action="store_true",
                   help="after a failed receive, build every tensor anew before the storage load (as vLLM does)")
    return p.parse_args(argv)


class _ToyEngine:
    """The ranks of one toy engine process: their hooks and tensors, the signal handlers that act on them."""

    def __init__(self, args: argparse.Namespace, cfg: dict[str, int], dtype_name: str) -> None:
        self.args = args
        self.cfg = cfg
        self.dtype_name = dtype_name
        self.dtype = DTYPES[dtype_name]
        self.hooks: list[RankHook] = []
        self.all_tensors: list[dict[str, torch.Tensor]] = []
        self.results: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.failed = threading.Event()

    def update_weights(self, *_: object) -> None:
        """SIGUSR1: an in-place weight update (RL, LoRA merge): bytes change, the layout does not."""
        for ts, h in zip(self.all_tensors, self.hooks, strict=False):
            ts["model.norm.weight"].add_(1)
            h.weights_changed()
        print(json.dumps({"event": "weights_updated"}), flush=True)

    def recheck(self, *_: object) -> None:
        """SIGUSR2: digests of the engine's bytes *now* (a READ landing after the verdict would show here)."""
        for ts, h in zip(self.all_tensors, self.hooks, strict=False):
            print(json.dumps({"event": "recheck", "rank": h.rank, "digests": digests(ts)}), flush=True)

    def serve_rank(self, rank: int) -> None:
        args = self.args
        t0 = time.monotonic()
        devices = args.devices.split(",")
        device = devices[rank % len(devices)]
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        tensors = rank_tensors(self.cfg, args.tp, rank, self.dtype, device)
        ident = ModelIdentity(args.model_id, args.revision, self.dtype_name, rank, args.tp)
        adapter = ToyAdapter(tensors, ident, args.checkpoint)
        adapter.prepare_delay, adapter.load_delay = args.prepare_delay, args.load_delay
        adapter.load_gate = args.load_gate
        adapter.prepare_realloc = args.prepare_realloc
        adapter.stale_derived = args.stale_derived
        adapter.rebuild_on_retry = args.rebuild_on_retry
        hook = RankHook(adapter, args.address)
        with self.lock:
            self.hooks.append(hook)
            self.all_tensors.append(tensors)
        try:
            outcome = hook.run_until_ready(args.sidecar_timeout)
        except Exception as e:
            print(json.dumps({"rank": rank, "error": str(e)}), flush=True)
            self.failed.set()
            return
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ready_s = round(time.monotonic() - t0, 3)
        line = {"rank": rank, "outcome": outcome, "prepared": adapter.prepared, "derived": adapter.norm_scale,
                "digests": {} if args.no_digests else digests(tensors),
                "tensors": len(tensors), "seconds": ready_s,
                "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
        with self.lock:
            self.results.append(line)
            print(json.dumps(line), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    meta = json.loads((Path(args.checkpoint) / "config.json").read_text())
    engine = _ToyEngine(args, meta["mx_toy"], meta["dtype"])
    torch.set_num_threads(1)
    stop = threading.Event()
    woken = threading.Event()  # SIGTERM, or every rank done

    def on_term(*_: object) -> None:
        stop.set()
        woken.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, engine.update_weights)
    signal.signal(signal.SIGUSR2, engine.recheck)
    threads = [threading.Thread(target=engine.serve_rank, args=(r,), daemon=True) for r in range(args.tp)]
    for t in threads:
        t.start()

    def join_ranks() -> None:
        for t in threads:
            t.join()
        woken.set()

    threading.Thread(target=join_ranks, daemon=True).start()
    woken.wait()
    if any(t.is_alive() for t in threads):
        # SIGTERM while ranks still wait for their sidecar: leave now, as a killed engine does (its hooks' sockets
        # belong to the rank threads). Before, the process sat out MX_SIDECAR_TIMEOUT and every test paid 10 s for
        # the harness's kill.
        sys.stdout.flush()
        os._exit(128 + signal.SIGTERM)
    if engine.failed.is_set():
        return 1
    if not args.exit_after_ready:
        stop.wait()
    for h in engine.hooks:
        h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
