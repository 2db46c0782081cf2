"""The vLLM worker's `EngineAdapter`: every step is vLLM's own code (loaders, post-processing), the re-derivation of
what vLLM keeps outside tensors, and the CPU GEMM handling that keeps post-processed weights exposable. What names
the loaded model is `runtime_hooks.engines.vllm.identity`.

This module imports vLLM only inside functions: it is importable (and type-checks) without vLLM.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from runtime_hooks.derived_state import module_numbers
from runtime_hooks.discovery import closure_items, discover_tensors
from runtime_hooks.engines.vllm.identity import model_identity
from runtime_hooks.exposure import ModelIdentity

log = logging.getLogger("mx.vllm")

__all__ = ["VllmAdapter", "exposable_cpu_gemm", "forget_model_layers", "rederive_kv_scales"]


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
        self._identity = model_identity(vllm_config, model_config, self.model)
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
        log.info("mx: rank %d loaded from storage (%s) and post-processed in %.2fs", self.rank,
                 type(self.storage_loader).__name__, time.monotonic() - t0)

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
        n = rederive_kv_scales(self.model)
        if n:
            log.info("mx: rank %d re-derived the KV-cache scales of %d attention layers from received weights",
                     self.rank, n)

    def derived_state(self) -> dict[str, str]:
        return module_numbers(self.model)

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
        with exposable_cpu_gemm(self._cpu_rebuild):
            process_weights_after_loading(self.model, self.model_config, self.device)
        gc.collect()
        torch.accelerator.empty_cache()
        self._processed = True


def rederive_kv_scales(model: torch.nn.Module) -> int:
    """Re-derive what vLLM's KV-cache quantization keeps outside tensors, from the received scale buffers.

    `BaseKVCacheMethod.process_weights_after_loading` (quantization/kv_cache.py, 0.26 and 0.32) copies the
    checkpoint's k/v/q scales into the `_k_scale`/`_v_scale`/`_q_scale` buffers and sets `_k_scale_float`,
    `_v_scale_float`, `_q_scale_float` and the host copies `_k_scale_cpu`/`_v_scale_cpu` to the same values; the
    CPU and FlashInfer-family backends read the floats. A target ran it on dummy weights (floats 1.0); the buffers
    are received, so the floats are set from them here. `_prob_scale_float` vLLM itself leaves at 1.0, so it is
    left alone; per-head scales (more than one element) have no float. Returns the layers re-derived."""
    n = 0
    for m in model.modules():
        scales = [getattr(m, f"_{x}_scale", None) for x in "kvq"]
        if not all(isinstance(t, torch.Tensor) and t.numel() == 1 for t in scales) or not hasattr(m, "_k_scale_float"):
            continue
        k, v, q = (float(t.item()) for t in scales)  # type: ignore[union-attr]
        for name, value in (("_k_scale_float", k), ("_v_scale_float", v), ("_q_scale_float", q)):
            setattr(m, name, value)
        for name, value in (("_k_scale_cpu", k), ("_v_scale_cpu", v)):
            host = getattr(m, name, None)
            if isinstance(host, torch.Tensor):
                host.fill_(value)
        n += 1
    return n


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



@contextlib.contextmanager
def exposable_cpu_gemm(opaque_layers: list[torch.nn.Module]) -> Iterator[None]:
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
        items = closure_items(fn) if fn is not None else []
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
