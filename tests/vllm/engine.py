"""One vLLM replica for the tests and the measurements: `python -m tests.vllm.engine --model DIR [--tp N] ...`

Starts vLLM's offline engine (`LLM`, V1, multiprocess workers as in production) with `load_format="mx-sidecar"`
(or `--load-format auto` for plain vLLM), then prints one JSON line:
  {"ready_s": seconds from process start to a ready engine, "load_s": {rank: seconds}, "tokens": greedy ids,
   "ranks": {rank: {"outcome", "tensors", "bytes", "digests": {name: xxh3}}}}
and keeps the engine (and its hooks, so it can serve as a source) alive until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

T0 = time.monotonic()
PROMPT = [1, 5, 9, 13, 17, 21, 25]


def report(worker: Any) -> dict[str, Any]:
    """Runs inside each vLLM worker (collective_rpc): what that rank holds, hashed in the worker itself."""
    import torch
    import xxhash
    from vllm.distributed import get_tensor_model_parallel_rank

    from runtime_hooks.discovery import discover_tensors
    from runtime_hooks.engines.vllm.plugin import outcome_for_rank

    rank = get_tensor_model_parallel_rank()
    model = worker.model_runner.get_model()
    # The KV cache is bound to the attention layers after loading: engine state, not weights.
    tensors = {n: t for n, t in discover_tensors(model).items() if "kv_cache" not in n.split(".")}
    digests, seen, nbytes = {}, set(), 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().reshape(-1)
        raw = t.view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b""
        digests[name] = f"{t.dtype}{list(tensors[name].shape)}:{xxhash.xxh3_64_hexdigest(raw)}"
        key = (tensors[name].untyped_storage().data_ptr(), tensors[name].untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            nbytes += key[1]
    return {"rank": rank, "outcome": outcome_for_rank(rank), "tensors": len(tensors), "bytes": nbytes,
            "digests": digests}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="mx-sidecar")
    p.add_argument("--storage-load-format", default="", help="mx: the vLLM load format for reading storage")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="GPU only (vLLM's default 0.9)")
    p.add_argument("--no-digests", action="store_true")
    p.add_argument("--exit-after-ready", action="store_true")
    p.add_argument("--compile", action="store_true", help="without enforce_eager: vLLM runs torch.compile")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--ready-file", default="", help="created once the engine is ready (MX_ENGINE_READY_URL=file://)")
    p.add_argument("--first-token", action="store_true", help="time one 1-token request right after ready")
    p.add_argument("--check", default="", help="a function of tests.vllm.worker_checks to run in every worker")
    a = p.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(report): test introspection
    if a.tp > 1:  # vLLM CPU binds one OpenMP thread set per worker; a 2-core box has one NUMA node
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1))
                                                                    for i in range(a.tp)))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    from vllm import LLM, SamplingParams

    kw: dict[str, Any] = {"gpu_memory_utilization": a.gpu_memory_utilization} if a.gpu_memory_utilization else {}
    if a.storage_load_format:
        kw["model_loader_extra_config"] = {"storage_load_format": a.storage_load_format}
    if a.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = a.max_num_batched_tokens
    llm = LLM(model=a.model, load_format=a.load_format, tensor_parallel_size=a.tp, dtype=a.dtype,
              skip_tokenizer_init=True, enforce_eager=not a.compile, max_model_len=256, max_num_seqs=4, seed=0,
              kv_cache_dtype=a.kv_cache_dtype, **kw)
    ready_s = time.monotonic() - T0
    if a.ready_file:
        with open(a.ready_file, "x"):  # what a readiness probe would see: the engine answers
            pass
    line: dict[str, Any] = {"ready_s": round(ready_s, 2)}
    if a.first_token:  # time to first token: process start -> the first request's one token
        llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        line["first_token_s"] = round(time.monotonic() - T0, 3)
    out = llm.generate([{"prompt_token_ids": PROMPT}],
                       SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True), use_tqdm=False)
    line["tokens"] = list(out[0].outputs[0].token_ids)
    if not a.no_digests:
        line["ranks"] = {r["rank"]: r for r in llm.collective_rpc(report)}
    print("MX_RESULT " + json.dumps(line), flush=True)
    if a.check:
        from tests.vllm import worker_checks

        checks = llm.collective_rpc(getattr(worker_checks, a.check))
        print("MX_CHECK " + json.dumps(checks), flush=True)
    if not a.exit_after_ready:
        while not stop.wait(0.5):
            pass
    del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
