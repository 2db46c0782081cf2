"""vLLM's side of the compile cache (runtime_hooks/compile_cache.py): its key, and the wait before it compiles.

vLLM (0.26-0.32) keeps torch.compile's output under VLLM_CACHE_ROOT: `torch_compile_cache/<hash>/rank_<r>_<dp>/`
(Dynamo + Inductor, with Inductor's and Triton's caches redirected inside it) and, with AOT compile (the default on
0.32, CPU included), `torch_compile_cache/torch_aot_compile/<hash>/`. Those directories install whole. The hash is
vLLM's own (its version, `VllmConfig.compute_hash()`, the traced code, the compiler); the key the sidecar matches
on is what decides it and what the plugin can know before compiling: vLLM's version and config hash, torch, Triton
and the device's architecture. vLLM still checks its own hash when it loads: a cache whose key matched ours but not
vLLM's is a miss (the sidecar sees new files and says so), never a wrong graph.

Rank 0 asks while the model is built, so the cache moves while the weights do; every rank waits for the verdict
after its weights, before vLLM compiles (MX_COMPILE_CACHE_WAIT at most).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from runtime_hooks.compile_cache import CacheVerdict, Exchange

log = logging.getLogger("mx.vllm")

# What installs whole (runtime_hooks/compile_cache.unit_of); anything else (modelinfos/<class>.json) file by file.
UNITS = ["torch_compile_cache/*", "torch_compile_cache/torch_aot_compile/*"]
# Asked for ahead, from the API process before it builds its config: vLLM inspects the model class there and keeps
# the result in modelinfos/<module>-<class>.json, keyed by the model module's content hash, which it checks itself.
# Measured on an H100 (vLLM 0.26): without the file, a fresh Python process imports torch and the model for 16 s of a
# 52 s cold start; the compile cache arrives only later, while the model is built.
AHEAD_FILES = ["modelinfos/*.json"]


def compiles(vllm_config: Any) -> bool:
    """Whether this engine runs torch.compile at all (enforce_eager, or compilation mode/level 0: no)."""
    if getattr(vllm_config.model_config, "enforce_eager", False):
        return False
    cc = vllm_config.compilation_config
    mode = getattr(cc, "mode", None)
    if mode is None:
        mode = getattr(cc, "level", 0)
    return int(mode or 0) > 0


def device_arch(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}".lower()


def cache_key(vllm_config: Any, device: torch.device) -> dict[str, str]:
    import vllm

    key = {"vllm": str(vllm.__version__), "config": str(vllm_config.compute_hash()), "torch": str(torch.__version__),
           "arch": device_arch(device)}
    try:
        import triton

        key["triton"] = str(triton.__version__)
    except ImportError:
        key["triton"] = "none"
    return key


@dataclass
class PendingCache:
    """A request (rank 0) or the wait for rank 0's verdict (other ranks)."""

    exchange: Exchange
    token: str  # '' on ranks other than 0
    since: float
    wait_s: float

    def wait(self) -> CacheVerdict | None:
        t0 = time.monotonic()
        if self.token:
            v = self.exchange.wait_verdict(self.token, self.wait_s)
        else:
            v = self.exchange.wait_any_verdict(self.since, self.wait_s)
        dt = time.monotonic() - t0
        if v is None:
            log.warning("mx: no compile cache verdict from the sidecar within %.0fs; vLLM compiles on its own",
                        self.wait_s)
        elif v.result == "installed":
            log.info("mx: compile cache installed (%s, %.1f MB) %.2fs after the weights: vLLM loads it instead of "
                     "compiling", v.detail, v.bytes / 1e6, dt)
        else:
            log.info("mx: compile cache %s (%s); vLLM compiles as usual", v.result, v.detail)
        return v


def ask_for_compile_cache(vllm_config: Any, model: str, rank: int, device: torch.device,
                          root: str, wait_s: float) -> PendingCache | None:
    """Rank 0 writes the request; None when there is nothing to ask (no root, no compile, no sidecar answering,
    or vLLM's cache root is elsewhere: it would not find what we install)."""
    if not root or not compiles(vllm_config):
        return None
    import vllm.envs as envs

    vllm_root = os.path.realpath(os.path.expanduser(str(envs.VLLM_CACHE_ROOT)))
    if vllm_root != os.path.realpath(root):
        log.warning("mx: MX_COMPILE_CACHE_DIR=%s but vLLM's cache root is %s (VLLM_CACHE_ROOT): no compile cache "
                    "is installed; set both to the same shared directory", root, vllm_root)
        return None
    ex = Exchange(root)
    if not ex.sidecar_announced():
        log.info("mx: no sidecar answers compile cache requests in %s; vLLM compiles as usual", root)
        return None
    if rank != 0:
        return PendingCache(ex, "", time.time() - 1.0, wait_s)
    key = cache_key(vllm_config, device)
    req = ex.request(model, key, UNITS)
    log.info("mx: asked the sidecar for a compile cache of %s (%s)", model,
             " ".join(f"{k}={v}" for k, v in sorted(key.items())))
    return PendingCache(ex, req.token, req.at, wait_s)


def model_from_argv(argv: list[str]) -> str:
    """The model a command line starts: `vllm serve MODEL`, `--model MODEL` or `--model=MODEL`; '' otherwise (an
    `LLM(model=...)` in a program without such an argument: nothing is asked for ahead)."""
    args = argv[1:]
    for i, a in enumerate(args):
        if a == "--model" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    if args[:1] == ["serve"] and len(args) > 1 and not args[1].startswith("-"):
        return args[1]
    return ""


def ask_ahead(root: str, wait_s: float, argv: list[str]) -> CacheVerdict | None:
    """From the API process, before vLLM builds its config: the source's modelinfos/ files (AHEAD_FILES), matched
    on vLLM's and torch's versions only (they do not depend on the engine's config). None when nothing was asked."""
    if not root:
        return None
    model = model_from_argv(argv)
    if not model:
        log.info("mx: no model on the command line (vllm serve MODEL, --model MODEL): modelinfos are not asked for "
                 "ahead")
        return None
    import vllm
    import vllm.envs as envs

    if os.path.realpath(os.path.expanduser(str(envs.VLLM_CACHE_ROOT))) != os.path.realpath(root):
        return None  # the worker says so once, when it would ask for the compile cache
    ex = Exchange(root)
    if not ex.sidecar_announced():
        return None
    key = {"vllm": str(vllm.__version__), "torch": str(torch.__version__)}
    req = ex.request(model, key, [], stage="ahead", only=AHEAD_FILES)
    t0 = time.monotonic()
    v = ex.wait_verdict(req.token, wait_s)
    if v is None:
        log.warning("mx: no verdict on %s within %.0fs; vLLM inspects the model itself", AHEAD_FILES, wait_s)
    else:
        log.info("mx: %s ahead: %s (%s) after %.2fs", AHEAD_FILES, v.result, v.detail, time.monotonic() - t0)
    return v
