"""Start-to-ready figures for docs/VLLM.md: plain vLLM vs `--load-format mx` as source and as target.

    python -m tests.vllm.measure [--hidden 1024 --layers 8 --vocab 32000] [--tp 1] [--runs 1]

Builds a seeded Llama checkpoint of that size, then per run: plain vLLM (load_format=auto), replica A
(mx, first: loads from storage, becomes a source), replica B (mx, target: receives from A). Prints a
markdown table. Times are from the engine's process start to a ready `LLM` object (`ready_s`), the
worker's weight phase (from its log line `mx: rank 0 weights ... in Xs`, or vLLM's own load lines for
plain), and the sidecar's `phase=receive` duration (the transfer + verify).
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

from sidecar.lab.embedded_redis import EmbeddedRedis
from tests.vllm.replica import VllmReplica
from tests.vllm.tiny_llama import make_tiny_llama


def _grab(lines: list[str], pattern: str) -> float | None:
    for line in lines:
        m = re.search(pattern, line)
        if m:
            return float(m.group(1))
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--runs", type=int, default=1)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mx-vllm-measure-"))
    shape = {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, "intermediate": a.hidden * 11 // 4,
             "heads": max(1, a.hidden // 64), "kv_heads": max(1, a.hidden // 256)}
    ckpt = make_tiny_llama(work / "ckpt", a.dtype, **shape)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    rows: dict[str, list[tuple[float, float | None, float | None]]] = {"plain": [], "source": [], "target": []}
    args = ["--no-digests"]
    for run in range(a.runs):
        plain = VllmReplica(f"plain{run}", ckpt, work, load_format="auto", sidecar=False, tp=a.tp,
                            engine_args=[*args, "--exit-after-ready"])
        res = plain.result(900)
        plain.engine.p.wait(60)
        load = _grab(plain.engine.lines, r"Loading weights took ([\d.]+) seconds")
        rows["plain"].append((res["ready_s"], load, None))
        with EmbeddedRedis() as redis:
            src = VllmReplica(f"a{run}", ckpt, work, redis.url, tp=a.tp, engine_args=args)
            tgt = None
            try:
                res_a = src.result(900)
                src.wait_serving(120)
                rows["source"].append((res_a["ready_s"], _grab(src.engine.lines, r"weights loaded in ([\d.]+)s"), None))
                tgt = VllmReplica(f"b{run}", ckpt, work, redis.url, tp=a.tp, engine_args=args)
                res_b = tgt.result(900)
                assert res_b["tokens"] == res_a["tokens"] == res["tokens"], "outputs differ"
                assert tgt.sidecar is not None
                recv = _grab(tgt.sidecar.lines, r"phase=receive [\d.]+ GB in ([\d.]+)s")
                got = _grab(tgt.engine.lines, r"weights received in ([\d.]+)s")
                rows["target"].append((res_b["ready_s"], got, recv))
            finally:
                if tgt is not None:
                    tgt.stop()
                src.stop()

    def med(xs: list[float | None]) -> str:
        vals = [x for x in xs if x is not None]
        return f"{statistics.median(vals):.2f}" if vals else "-"

    print(f"\ncheckpoint: {size / 1e9:.2f} GB {a.dtype}, hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, "
          f"TP={a.tp}, runs={a.runs} (medians)\n")
    print("| replica | start -> ready (s) | weights phase in the worker (s) | sidecar receive (s) |")
    print("|---|---|---|---|")
    for name, label in (("plain", "plain vLLM, default loader"), ("source", "mx, first replica (storage, source)"),
                        ("target", "mx, second replica (target)")):
        rs = rows[name]
        print(f"| {label} | {med([r[0] for r in rs])} | {med([r[1] for r in rs])} | {med([r[2] for r in rs])} |")


if __name__ == "__main__":
    main()
