"""vLLM plugin: load format `mx`, backed by the mx sidecar.

Entry point (pyproject, `vllm.general_plugins`): `mx = "runtime_hooks.engines.vllm.plugin:register"`.
vLLM calls `register()` in every process it starts (API/LLM process, engine core, workers); only the worker
that builds the model ever uses the loader. A user adds `--load-format mx` and `MX_ZMQ_ADDRESS`.

Per worker (TP rank r), inside `MxModelLoader.load_model`:
  check that this vLLM has what the loader uses (`vllm_compat`; else vLLM's default loader reads storage) ->
  build the model without reading weights -> identity -> `RankHook` binds `<MX_ZMQ_ADDRESS>-<r>` ->
    source: vLLM's loader for `storage_load_format` (default auto) reads storage, its post-processing, expose;
    target: vLLM's dummy loader, the same post-processing (same layout), expose, wait for weights_ready,
            refresh host-side state derived from the weights;
    no sidecar within MX_SIDECAR_TIMEOUT: the default loader reads storage (logged).
The hook then keeps serving from a background thread, so this replica can be a source.

The adapter (vLLM's steps, the model's identity) is `runtime_hooks.engines.vllm.adapter`; tensor discovery and
checkpoint naming, which any engine shares, are `runtime_hooks.discovery` and `runtime_hooks.identity`.

This module imports vLLM only inside functions: it is importable (and type-checks) without vLLM.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from runtime_hooks.engines.vllm import compat as vllm_compat
from runtime_hooks.engines.vllm.adapter import VllmAdapter

if TYPE_CHECKING:
    from runtime_hooks.hook import RankHook

log = logging.getLogger("mx.vllm")

LOAD_FORMAT = "mx-sidecar"  # a name no other project registers
# Also ModelExpress' alias of `modelexpress`; vLLM lets the last registration win (with a warning), so `mx` is ours
# only where nothing else holds it when we register, and the log says which.
ALIAS = "mx"
# Keys of --model-loader-extra-config that belong to us (the rest goes to vLLM's default loader).
EXTRA_STORAGE_FORMAT = "storage_load_format"  # what "load from storage" means; default "auto"
EXTRA_SIDECAR_TIMEOUT = "sidecar_timeout"  # seconds; default MX_SIDECAR_TIMEOUT

_registered = False


class VllmHooks:
    """The live rank hooks of one process (one per TP rank, kept for the model's life) and how each rank's weights
    got there: received | loaded | loaded_without_sidecar | loaded_without_hook | loaded_by_vllm.

    The loader class holds one and every loader instance uses it: vLLM builds a new loader for a rebuilt model,
    and the new model's hook must close the old one to take the rank's socket."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: dict[int, RankHook] = {}
        self._outcomes: dict[int, str] = {}

    def start(self, adapter: VllmAdapter) -> RankHook:
        """A hook for `adapter`'s rank; an earlier one of that rank (a rebuilt model) is closed first."""
        from runtime_hooks.hook import RankHook

        with self._lock:
            old = self._hooks.pop(adapter.rank, None)
        if old is not None:  # the model is being rebuilt in this process: the new one takes the socket
            old.close()
        hook = RankHook(adapter)
        with self._lock:
            self._hooks[adapter.rank] = hook
        return hook

    def hook(self, rank: int) -> RankHook | None:
        with self._lock:
            return self._hooks.get(rank)

    def outcome(self, rank: int) -> str:
        with self._lock:
            return self._outcomes.get(rank, "")

    def record(self, rank: int, outcome: str, *, keep: bool = False) -> None:
        """Note how `rank`'s weights got there; with `keep`, an outcome noted before stays (a draft model)."""
        with self._lock:
            if keep:
                self._outcomes.setdefault(rank, outcome)
            else:
                self._outcomes[rank] = outcome

    def close(self) -> None:
        with self._lock:
            hooks = list(self._hooks.values())
            self._hooks.clear()
        for h in hooks:
            with contextlib.suppress(Exception):
                h.close()


# This process's hooks: vLLM constructs loaders itself (from a LoadConfig alone), so the loader class is handed
# this one object when it is built; the functions below read the same object for tests and introspection.
_process_hooks = VllmHooks()
atexit.register(_process_hooks.close)


def hook_for_rank(rank: int) -> RankHook | None:
    """The live hook of `rank` in this process (tests, introspection)."""
    return _process_hooks.hook(rank)


def outcome_for_rank(rank: int) -> str:
    """How `rank`'s weights got there in this process ('' when the mx loader did not load it)."""
    return _process_hooks.outcome(rank)


# --------------------------------------------------------------------------------------------- plugin

def register() -> None:
    """vLLM general plugin: register load format `mx-sidecar` (and `mx` where free). Safe to call many times and in
    every process.

    A vLLM that lacks what registering needs gets one log line (version, what is missing) and no `mx` format."""
    global _registered
    if _registered:
        return
    _registered = True
    _route_logs_to_vllm()
    gone = vllm_compat.missing_for_register()
    if gone:
        log.warning("mx: %s; the mx load format is not registered (start vLLM without --load-format mx)",
                    vllm_compat.describe_missing(gone))
        return
    from vllm.model_executor import model_loader

    cls = loader_class()
    model_loader.register_model_loader(LOAD_FORMAT)(cls)
    registry = getattr(model_loader, "_LOAD_FORMAT_TO_MODEL_LOADER", {})
    holder = registry.get(ALIAS)
    if holder is None or holder is cls:
        model_loader.register_model_loader(ALIAS)(cls)
        log.info("mx: load formats %s and %s (alias) registered", LOAD_FORMAT, ALIAS)
    else:
        log.warning("mx: load format %r is held by %s.%s (ModelExpress?), left to it: use --load-format %s",
                    ALIAS, holder.__module__, holder.__qualname__, LOAD_FORMAT)
    _ask_ahead()


def _ask_ahead() -> None:
    """In the process vLLM starts first (API server, LLM): what it reads before it builds its config, while nothing
    else has begun (runtime_hooks/engines/vllm/compile_cache.ask_ahead). Never fatal."""
    import multiprocessing
    import sys

    if multiprocessing.parent_process() is not None:  # engine core, workers: the first process asked already
        return
    from runtime_hooks.engines.vllm.compile_cache import ask_ahead
    from sidecar.config import Config

    try:
        cfg = Config.from_env()
        ask_ahead(cfg.compile_cache_dir, cfg.compile_cache_wait, sys.argv)
    except Exception as e:
        log.warning("mx: nothing asked for ahead (%s: %s); vLLM inspects the model itself", type(e).__name__, e)


def _route_logs_to_vllm() -> None:
    """Our `mx.*` loggers (hook, loader) write through vLLM's handlers, so their lines appear in vLLM's log
    with vLLM's process prefix; a program that configured `mx` logging itself keeps its own setup."""
    mx = logging.getLogger("mx")
    vllm_logger = logging.getLogger("vllm")
    if mx.handlers or not vllm_logger.handlers:
        return
    for h in vllm_logger.handlers:
        mx.addHandler(h)
    if mx.level == logging.NOTSET:
        mx.setLevel(logging.INFO)
    mx.propagate = False


_loader_cls: type | None = None


def loader_class() -> type:
    """The `BaseModelLoader` subclass for `mx`, built on first use so that importing this module needs no vLLM."""
    global _loader_cls
    if _loader_cls is None:
        _loader_cls = _build_loader_class(_process_hooks)
    return _loader_cls


def _build_loader_class(hooks: VllmHooks) -> type:
    # Longer than 60 lines: it is the body of one class, defined here because vLLM's base class may be imported
    # only lazily (this module imports without vLLM); each method stays short.
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class MxModelLoader(BaseModelLoader):  # type: ignore[misc,valid-type]
        """Load format `mx`: weights from a live replica through the mx sidecar, else from storage."""

        def __init__(self, load_config: LoadConfig) -> None:
            super().__init__(load_config)
            self.hooks = hooks
            extra = dict(load_config.model_loader_extra_config or {})
            storage_format = str(extra.pop(EXTRA_STORAGE_FORMAT, "auto"))
            if storage_format in (LOAD_FORMAT, ALIAS):
                raise ValueError(f"{EXTRA_STORAGE_FORMAT} cannot be {storage_format!r}")
            timeout = extra.pop(EXTRA_SIDECAR_TIMEOUT, None)
            self.sidecar_timeout = float(timeout) if timeout is not None else None
            # What a source (or a fallback) runs: vLLM's own loader for that format (auto, safetensors, sharded_state,
            # runai_streamer, tensorizer, ...), never a copy of its logic; an unknown format fails here, at start.
            self.storage_config = dataclasses.replace(
                load_config, load_format=storage_format, model_loader_extra_config=extra
            )
            self.storage_loader = get_model_loader(self.storage_config)

        def download_model(self, model_config: Any) -> None:
            self.storage_loader.download_model(model_config)

        def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
            """In-place reload of an already built model (vLLM's standalone API): from storage."""
            self.storage_loader.load_weights(model, model_config)

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> torch.nn.Module:
            gone = vllm_compat.missing_for_load() + vllm_compat.missing_in_config(vllm_config)
            if gone:
                log.warning("mx: %s; vLLM's default loader reads storage", vllm_compat.describe_missing(gone))
                return self._default_load(vllm_config, model_config, prefix)
            why_not = _unsupported(vllm_config, model_config)
            if why_not:
                log.warning("mx: %s; loading from storage without the sidecar", why_not)
                return self._default_load(vllm_config, model_config, prefix)
            from vllm.utils.torch_utils import set_default_torch_dtype

            where: Any = self.load_config.device or vllm_config.device_config.device
            device = torch.device(where)
            dtype: Any = model_config.dtype  # resolved to a torch.dtype by vLLM before any loader runs

            def build() -> torch.nn.Module:
                with set_default_torch_dtype(dtype), device:
                    return vllm_compat.create_model(self, vllm_config, model_config, prefix)  # type: ignore[no-any-return]

            t0 = time.monotonic()
            layers_before = set(vllm_config.compilation_config.static_forward_context)
            try:
                adapter = VllmAdapter(build, vllm_config, model_config, self.storage_loader, device)
            except Exception as e:  # an API of this vLLM behaves unlike the tested ones: never take the engine down
                log.warning("mx: vLLM %s: building the model for the sidecar failed (%s: %s); vLLM's default loader "
                            "reads storage", vllm_compat.version(), type(e).__name__, e)
                ctx = vllm_config.compilation_config.static_forward_context
                for name in set(ctx) - layers_before:  # the half-built model's layers would clash with the next
                    del ctx[name]
                gc.collect()
                return self._default_load(vllm_config, model_config, prefix)
            try:
                hook = self.hooks.start(adapter)
            except Exception:
                log.exception("mx: could not start the rank hook; loading from storage without the sidecar")
                with set_default_torch_dtype(dtype):
                    adapter.load_from_storage()
                self.hooks.record(adapter.rank, "loaded_without_hook")
                return adapter.model.eval()
            cache = _ask_for_compile_cache(vllm_config, adapter, device)  # moves while the weights do
            with set_default_torch_dtype(dtype):
                outcome = hook.run_until_ready(self.sidecar_timeout)
            self.hooks.record(adapter.rank, outcome)
            log.info("mx: rank %d weights %s in %.2fs", adapter.rank, outcome, time.monotonic() - t0)
            if cache is not None:
                _wait_for_compile_cache(cache)  # before vLLM compiles: what was installed is there, or nothing
            return adapter.model.eval()

        def _default_load(self, vllm_config: Any, model_config: Any, prefix: str) -> torch.nn.Module:
            """vLLM's default loader, exactly as `--load-format auto` (or `storage_load_format`) would run it."""
            model = self.storage_loader.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            # keep: a draft model leaves the rank's outcome as its target model set it
            self.hooks.record(_tp_rank_or_zero(), "loaded_by_vllm", keep=True)
            return model  # type: ignore[no-any-return]

    return MxModelLoader


def _ask_for_compile_cache(vllm_config: Any, adapter: VllmAdapter, device: torch.device) -> Any:
    """The sidecar's compile cache for this engine (runtime_hooks/engines/vllm/compile_cache.py), or None. Never
    fatal: a cache is an optimisation, the engine compiles without it."""
    from runtime_hooks.engines.vllm.compile_cache import ask_for_compile_cache
    from sidecar.config import Config

    try:
        cfg = Config.from_env()
        return ask_for_compile_cache(vllm_config, adapter.identity().model_id, adapter.rank, device,
                                     cfg.compile_cache_dir, cfg.compile_cache_wait)
    except Exception as e:  # a cache is never worth the engine: any failure here means vLLM compiles (measured:
        # torch.__version__ is a str subclass msgspec refused, and the TypeError took the engine core down)
        log.warning("mx: no compile cache request (%s: %s); vLLM compiles as usual", type(e).__name__, e)
        return None


def _wait_for_compile_cache(cache: Any) -> None:
    try:
        cache.wait()
    except Exception as e:  # as above: the engine compiles without it
        log.warning("mx: waiting for the compile cache failed (%s: %s); vLLM compiles as usual", type(e).__name__, e)


def _tp_rank_or_zero() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:
        return 0


def _unsupported(vllm_config: Any, model_config: Any) -> str:
    """Why this configuration cannot use the hook ('' when it can)."""
    pc = vllm_config.parallel_config
    if pc.pipeline_parallel_size > 1:
        return "pipeline parallelism is not supported yet (rank sockets are per TP rank)"
    if pc.data_parallel_size > 1:
        return "data parallelism in one server is not supported yet (rank sockets are per TP rank)"
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None and model_config is getattr(spec, "draft_model_config", None):
        # The target model of this worker already holds the rank's socket.
        return "speculative draft models load from storage"
    return ""

