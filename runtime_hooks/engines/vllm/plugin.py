"""vLLM plugin: load format `mx`, backed by the mx sidecar.

Entry point (pyproject, `vllm.general_plugins`): `mx = "runtime_hooks.engines.vllm.plugin:register"`.
vLLM calls `register()` in every process it starts (API/LLM process, engine core, workers); only the worker
that builds the model ever uses the loader. A user adds `--load-format mx` and `MX_ZMQ_ADDRESS`.

Per worker (TP rank r), inside `MxModelLoader.load_model`:
  check that this vLLM has what the loader uses (`vllm_compat`; else vLLM's default loader reads storage) ->
  build the model without reading weights -> identity -> `RankHook` binds `<MX_ZMQ_ADDRESS>-<r>` ->
    source: vLLM's default loader reads storage, vLLM's `process_weights_after_loading`, expose;
    target: vLLM's dummy loader, the same post-processing (same layout), expose, wait for weights_ready,
            refresh host-side state derived from the weights;
    no sidecar within MX_SIDECAR_TIMEOUT: the default loader reads storage (logged).
The hook then keeps serving from a background thread, so this replica can be a source.

This module imports vLLM only inside functions: it is importable (and type-checks) without vLLM.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runtime_hooks.engines.vllm import compat as vllm_compat
from runtime_hooks.exposure import ModelIdentity

if TYPE_CHECKING:
    from runtime_hooks.base import RankHook

log = logging.getLogger("mx.vllm")

LOAD_FORMAT = "mx"
# Keys of --model-loader-extra-config that belong to us (the rest goes to vLLM's default loader).
EXTRA_STORAGE_FORMAT = "storage_load_format"  # what "load from storage" means; default "auto"
EXTRA_SIDECAR_TIMEOUT = "sidecar_timeout"  # seconds; default MX_SIDECAR_TIMEOUT

_registered = False
_hooks: dict[int, RankHook] = {}  # one live hook per TP rank of this process, kept for the model's life
_outcomes: dict[int, str] = {}  # how each rank's weights got there: received | loaded | loaded_without_sidecar | ...
_hooks_lock = threading.Lock()


# --------------------------------------------------------------------------------------------- plugin


def register() -> None:
    """vLLM general plugin: register load format `mx`. Safe to call many times and in every process.

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
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(loader_class())


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
        _loader_cls = _build_loader_class()
    return _loader_cls


def _build_loader_class() -> type:
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    class MxModelLoader(BaseModelLoader):  # type: ignore[misc,valid-type]
        """Load format `mx`: weights from a live replica through the mx sidecar, else from storage."""

        def __init__(self, load_config: LoadConfig) -> None:
            super().__init__(load_config)
            extra = dict(load_config.model_loader_extra_config or {})
            storage_format = str(extra.pop(EXTRA_STORAGE_FORMAT, "auto"))
            if storage_format == LOAD_FORMAT:
                raise ValueError(f"{EXTRA_STORAGE_FORMAT} cannot be {LOAD_FORMAT!r}")
            timeout = extra.pop(EXTRA_SIDECAR_TIMEOUT, None)
            self.sidecar_timeout = float(timeout) if timeout is not None else None
            # What a source (or a fallback) runs: vLLM's own default loader, never a copy of its logic.
            self.storage_config = dataclasses.replace(
                load_config, load_format=storage_format, model_loader_extra_config=extra
            )
            self.storage_loader = DefaultModelLoader(self.storage_config)

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
                hook = _start_hook(adapter)
            except Exception:
                log.exception("mx: could not start the rank hook; loading from storage without the sidecar")
                with set_default_torch_dtype(dtype):
                    adapter.load_from_storage()
                _outcomes[adapter.rank] = "loaded_without_hook"
                return adapter.model.eval()
            with set_default_torch_dtype(dtype):
                outcome = hook.run_until_ready(self.sidecar_timeout)
            _outcomes[adapter.rank] = outcome
            log.info("mx: rank %d weights %s in %.2fs", adapter.rank, outcome, time.monotonic() - t0)
            return adapter.model.eval()

        def _default_load(self, vllm_config: Any, model_config: Any, prefix: str) -> torch.nn.Module:
            """vLLM's default loader, exactly as `--load-format auto` (or `storage_load_format`) would run it."""
            model = self.storage_loader.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            _outcomes.setdefault(_tp_rank_or_zero(), "loaded_by_vllm")  # a draft model keeps the rank's outcome
            return model  # type: ignore[no-any-return]

    return MxModelLoader


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


def _start_hook(adapter: VllmAdapter) -> RankHook:
    from runtime_hooks.base import RankHook

    rank = adapter.rank
    with _hooks_lock:
        old = _hooks.pop(rank, None)
    if old is not None:  # the model is being rebuilt in this process: the new one takes the socket
        old.close()
    hook = RankHook(adapter)
    with _hooks_lock:
        _hooks[rank] = hook
    return hook


def hook_for_rank(rank: int) -> RankHook | None:
    """The live hook of `rank` in this process (tests, introspection)."""
    with _hooks_lock:
        return _hooks.get(rank)


def outcome_for_rank(rank: int) -> str:
    """How `rank`'s weights got there in this process ('' when the mx loader did not load it)."""
    return _outcomes.get(rank, "")


@atexit.register
def _close_hooks() -> None:
    with _hooks_lock:
        hooks = list(_hooks.values())
        _hooks.clear()
    for h in hooks:
        with contextlib.suppress(Exception):
            h.close()


# --------------------------------------------------------------------------------------------- adapter


class VllmAdapter:
    """`EngineAdapter` for one vLLM worker: every step is vLLM's own code (loaders, post-processing)."""

    def __init__(
        self,
        build: Callable[[], torch.nn.Module],
        vllm_config: Any,
        model_config: Any,
        storage_loader: Any,
        device: torch.device,
    ) -> None:
        self._build = build
        self.vllm_config = vllm_config
        self.model_config = model_config
        self.storage_loader = storage_loader
        self.device = device
        self.model = build()
        self._processed = False
        self._cpu_rebuild: list[torch.nn.Module] = []  # layers whose CPU GEMM state is opaque (see below)
        # Before any load: post-processing may mutate hf_config (quantization_config), which would change the hash.
        self._identity = _identity(vllm_config, model_config)
        self.rank = self._identity.tp_rank

    # -- EngineAdapter

    def identity(self) -> ModelIdentity:
        return self._identity

    def discover_tensors(self) -> dict[str, torch.Tensor]:
        return discover_tensors(self.model, self.device.type)

    @torch.no_grad()
    def load_from_storage(self) -> None:
        if self._processed:  # post-processing is not reversible in general: start from a fresh model
            self._rebuild()
        t0 = time.monotonic()
        self.storage_loader.load_weights(self.model, self.model_config)
        self._post_process()
        log.info("mx: rank %d loaded from storage and post-processed in %.2fs", self.rank, time.monotonic() - t0)

    @torch.no_grad()
    def prepare_target(self) -> None:
        from vllm.config.load import LoadConfig
        from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

        t0 = time.monotonic()
        DummyModelLoader(LoadConfig(load_format="dummy")).load_weights(self.model, self.model_config)
        self._post_process()
        log.info("mx: rank %d target prepared (dummy weights, post-processed) in %.2fs", self.rank,
                 time.monotonic() - t0)

    @torch.no_grad()
    def after_receive(self) -> None:
        """Rebuild state that vLLM derived from weights into places we cannot expose (opaque kernel handles)."""
        from vllm.model_executor.layers import utils as layer_utils

        dispatch = layer_utils.dispatch_cpu_unquantized_gemm
        rebuild = getattr(dispatch, "_mx_original", dispatch)
        for layer in self._cpu_rebuild:
            rebuild(layer, remove_weight=False)
        if self._cpu_rebuild:
            log.info("mx: rank %d rebuilt %d CPU GEMM handles from received weights", self.rank, len(self._cpu_rebuild))

    def reset_for_retry(self) -> None:
        """A receive failed; load_from_storage will start from a freshly built model."""
        self._rebuild()

    # -- internals

    def _rebuild(self) -> None:
        forget_model_layers(self.vllm_config, self.model)
        self.model = None  # type: ignore[assignment]
        self._cpu_rebuild = []
        gc.collect()
        self.model = self._build()
        self._processed = False

    def _post_process(self) -> None:
        """What vLLM's `BaseModelLoader.load_model` runs after `load_weights`, in the same order."""
        from vllm.model_executor.model_loader import base_loader
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        gc.collect()
        torch.accelerator.empty_cache()
        has_online_quant = getattr(base_loader, "_has_online_quant", None)
        if has_online_quant is not None and has_online_quant(self.model):
            from vllm.model_executor.model_loader.reload import finalize_layerwise_processing

            finalize_layerwise_processing(self.model, self.model_config)
        with _exposable_cpu_gemm(self._cpu_rebuild):
            process_weights_after_loading(self.model, self.model_config, self.device)
        gc.collect()
        torch.accelerator.empty_cache()
        self._processed = True


def forget_model_layers(vllm_config: Any, model: torch.nn.Module | None) -> int:
    """Unregister `model`'s layers from vLLM's per-config layer registry (attention layers register by name
    and refuse a duplicate), so that a fresh model can be built in this process. Returns how many."""
    if model is None:
        return 0
    ctx = vllm_config.compilation_config.static_forward_context
    ours = {id(m) for m in model.modules()}
    names = [k for k, v in ctx.items() if id(v) in ours]
    for k in names:
        del ctx[k]
    return len(names)


# --------------------------------------------------------------------------------------------- discovery


def discover_tensors(model: torch.nn.Module, device_type: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor the model holds: parameters, buffers, tensor attributes of modules (also inside lists,
    tuples and dicts), and tensors captured by kernel closures such as vLLM CPU's packed GEMM weights.

    Aliases keep their own names (the hook dedupes by storage). Meta tensors hold no bytes and are skipped;
    with `device_type`, tensors on other devices are skipped too (e.g. CPU copies kept beside GPU weights).
    """
    found: dict[str, torch.Tensor] = {}

    def add(name: str, t: object) -> None:
        if isinstance(t, torch.Tensor) and not t.is_meta and (device_type is None or t.device.type == device_type):
            found[name] = t.data if isinstance(t, torch.nn.Parameter) else t

    for mname, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for leaf, p in module._parameters.items():
            add(prefix + leaf, p)
        for leaf, b in module._buffers.items():
            add(prefix + leaf, b)
        for attr, value in vars(module).items():
            if attr.startswith("__") or attr in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, torch.Tensor):
                add(prefix + attr, value)
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    add(f"{prefix}{attr}.{i}", v)
            elif isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(k, (str, int)):
                        add(f"{prefix}{attr}.{k}", v)
            elif callable(value) and not isinstance(value, torch.nn.Module):
                for var, v in _closure_items(value):
                    add(f"{prefix}{attr}.{var}", v)
    return found


def _closure_items(fn: object) -> list[tuple[str, object]]:
    """(free variable, value) pairs of a Python closure, plus its default arguments."""
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    items: list[tuple[str, object]] = []
    if code is not None:
        for var, cell in zip(code.co_freevars, cells, strict=False):
            with contextlib.suppress(ValueError):  # an empty cell
                items.append((var, cell.cell_contents))
        defaults = getattr(fn, "__defaults__", None) or ()
        names = code.co_varnames[code.co_argcount - len(defaults): code.co_argcount]
        items.extend(zip(names, defaults, strict=False))
    return items


@contextlib.contextmanager
def _exposable_cpu_gemm(opaque_layers: list[torch.nn.Module]) -> Iterator[None]:
    """vLLM CPU packs linear weights at post-processing time (layers/utils.py `dispatch_cpu_unquantized_gemm`):
    oneDNN keeps the packed copy inside a C++ handle nobody can map, and `remove_weight=True` then frees the
    plain weight. Within this context, a layer whose packed form is such an opaque handle keeps its plain
    weight (exposed and transferred) and is listed in `opaque_layers` so that `after_receive` rebuilds its
    handle from the received bytes. Packed forms held in tensors (sgl/zentorch closures) are exposed as they
    are and vLLM's weight removal applies unchanged. Without a CPU platform this changes nothing.
    """
    from vllm.model_executor.layers import utils as layer_utils
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        yield
        return
    original = layer_utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        original(layer, remove_weight=False)
        fn = getattr(layer, "cpu_linear", None)
        items = _closure_items(fn) if fn is not None else []
        if not items:
            return  # plain torch linear on the layer's own weight: nothing derived
        if any(isinstance(v, torch.Tensor) for _, v in items):
            if remove_weight:  # what vLLM does after packing into a tensor we expose
                w: torch.Tensor = layer.weight  # type: ignore[assignment]
                layer.weight = torch.nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)
            return
        opaque_layers.append(layer)

    dispatch._mx_original = original  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch
    try:
        yield
    finally:
        layer_utils.dispatch_cpu_unquantized_gemm = original


# --------------------------------------------------------------------------------------------- identity


def _identity(vllm_config: Any, model_config: Any) -> ModelIdentity:
    import vllm
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.platforms import current_platform

    pc = vllm_config.parallel_config
    tp_size = get_tensor_model_parallel_world_size()
    tp_rank = get_tensor_model_parallel_rank()
    quant = model_config.quantization or "none"
    hf = model_config.hf_config
    extra: dict[str, str] = {
        "engine": f"vllm-{vllm.__version__}",
        "arch": ",".join(getattr(hf, "architectures", None) or []),
        "pp": f"{pc.pipeline_parallel_size}",
        "dp": f"{pc.data_parallel_size}",
        "ep": str(bool(getattr(pc, "enable_expert_parallel", False))),
        "platform": str(current_platform.device_type),
        "hf_config": _digest(_hf_config_text(hf)),
    }
    qcfg = getattr(hf, "quantization_config", None)
    if qcfg is not None:
        extra["quant_config"] = _digest(json.dumps(qcfg, sort_keys=True, default=str))
    if current_platform.is_cpu():
        extra["cpu_gemm"] = _cpu_gemm_features()
    return ModelIdentity(
        model_id=str(model_config.model),
        revision=_revision(model_config),
        dtype=str(model_config.dtype).removeprefix("torch."),
        tp_rank=tp_rank,
        tp_size=tp_size,
        quantization=str(quant),
        extra=tuple(sorted(extra.items())),
    )


def _hf_config_text(hf: Any) -> str:
    try:
        return str(hf.to_json_string(use_diff=False))
    except Exception:
        return repr(hf)


def _cpu_gemm_features() -> str:
    """The CPU features that pick vLLM's packed weight layout (sgl AMX, oneDNN, zentorch)."""
    from vllm import _custom_ops as ops

    feats = {
        "amx": torch.cpu._is_amx_tile_supported(),
        "avx512bf16": torch.cpu._is_avx512_bf16_supported(),
        "onednn": bool(getattr(ops, "_supports_onednn", False)),
        "zentorch": hasattr(torch.ops, "zentorch") and hasattr(torch.ops.zentorch, "zentorch_linear_unary"),
    }
    return ",".join(k for k, v in feats.items() if v) or "plain"


def _revision(model_config: Any) -> str:
    """MX_MODEL_REVISION, else vLLM's --revision, else (local directory) a digest of its config and weight
    file headers (names, dtypes, shapes, sizes; no weight bytes are read), else "main"."""
    from sidecar.config import Config

    env = Config.from_env().model_revision
    if env:
        return env
    if model_config.revision:
        return str(model_config.revision)
    path = Path(str(model_config.model))
    if path.is_dir():
        return "local-" + local_checkpoint_digest(path)
    return "main"


def local_checkpoint_digest(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with f.open("rb") as fh:
            head = fh.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= 100 << 20:
                    h.update(fh.read(n))
    for f in sorted(path.glob("*.bin")) + sorted(path.glob("*.pt")):
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
    return h.hexdigest()[:16]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
