"""What names a vLLM worker's model: the checkpoint and everything that picks the final layout of its weights.
The sidecar copies only between equal identities (runtime_hooks.exposure.ModelIdentity); records carry the fields,
so `mx-sidecar status --explain` names the ones two replicas differ in.

This module imports vLLM only inside functions.
"""

from __future__ import annotations

from typing import Any

import torch

from runtime_hooks.exposure import ModelIdentity
from runtime_hooks.identity import checkpoint_revision, config_text, digest, json_digest

__all__ = ["chosen_kernels", "kernel_library_versions", "model_identity", "vllm_env_fields"]


def model_identity(vllm_config: Any, model_config: Any, model: torch.nn.Module | None = None) -> ModelIdentity:
    """What this worker loads, as vLLM configured it: the sidecar copies only between equal identities.

    Besides the checkpoint and parallelism: everything that picks the weights' final layout (vLLM rewrites some
    weights in place per GPU architecture and kernel backend): platform and compute capability (CPU: its ISA
    features), kv-cache dtype, quantization config, the kernels vLLM chose for `model`, the `VLLM_*` settings
    (every one not known to be layout-neutral: fail closed) and the versions of the kernel libraries."""
    import vllm
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.platforms import current_platform

    pc = vllm_config.parallel_config
    tp_size = get_tensor_model_parallel_world_size()
    tp_rank = get_tensor_model_parallel_rank()
    quant = model_config.quantization or "none"
    hf = model_config.hf_config
    cache = getattr(vllm_config, "cache_config", None)
    extra: dict[str, str] = {
        "engine": f"vllm-{vllm.__version__}",
        "arch": ",".join(getattr(hf, "architectures", None) or []),
        "pp": f"{pc.pipeline_parallel_size}",
        "dp": f"{pc.data_parallel_size}",
        "ep": str(bool(getattr(pc, "enable_expert_parallel", False))),
        "platform": str(current_platform.device_type),
        "capability": _capability(current_platform),
        "hf_config": digest(config_text(hf)),
        "kv_cache_dtype": str(getattr(cache, "cache_dtype", "?")),
        "calculate_kv_scales": str(getattr(cache, "calculate_kv_scales", False)),
        "libs": kernel_library_versions(),
        **vllm_env_fields(),
    }
    if model is not None:
        extra["kernels"] = chosen_kernels(model)
    qcfg = getattr(hf, "quantization_config", None)
    if qcfg is not None:
        extra["quant_config"] = json_digest(qcfg)
    if current_platform.is_cpu():
        extra["cpu"] = _cpu_features()
    return ModelIdentity(
        model_id=str(model_config.model),
        revision=checkpoint_revision(str(model_config.model), model_config.revision),
        dtype=str(model_config.dtype).removeprefix("torch."),
        tp_rank=tp_rank,
        tp_size=tp_size,
        quantization=str(quant),
        extra=tuple(sorted(extra.items())),
    )


# VLLM_* settings known not to change which kernels run or how weights are laid out (ports, logging, telemetry,
# timeouts, paths, media fetching). Every other VLLM_* variable that is set joins the identity, unknown ones too:
# a spurious mismatch costs a storage load, a missing field costs wrong outputs. Values enter as digests (a
# VLLM_API_KEY must not land in Redis records); the names stay readable for `mx-sidecar status --explain`.
_LAYOUT_NEUTRAL_VLLM = frozenset({
    "VLLM_API_KEY", "VLLM_HOST_IP", "VLLM_PORT", "VLLM_CONFIGURE_LOGGING", "VLLM_NO_USAGE_STATS", "VLLM_DO_NOT_TRACK",
    "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "VLLM_ASSETS_CACHE", "VLLM_WORKER_MULTIPROC_METHOD", "VLLM_PLUGINS",
    "VLLM_ENGINE_ITERATION_TIMEOUT_S", "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "VLLM_SERVER_DEV_MODE",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ENGINE_READY_TIMEOUT_S",
    # set by vLLM itself in every engine, a random id for its distributed setup (measured: with it in the identity
    # no two CPU replicas matched; `status --explain` named it)
    "VLLM_DIST_IDENT",
})
_LAYOUT_NEUTRAL_VLLM_PREFIXES = ("VLLM_LOGGING_", "VLLM_LOG_", "VLLM_USAGE_", "VLLM_RPC_", "VLLM_HTTP_", "VLLM_MEDIA_",
                                 "VLLM_IMAGE_", "VLLM_VIDEO_", "VLLM_AUDIO_", "VLLM_TRACE_", "VLLM_DEBUG_",
                                 "VLLM_TORCH_PROFILER_", "VLLM_PROFILER_")


def vllm_env_fields(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`env.<NAME>` -> digest of the value, for every set VLLM_* variable not known to be layout-neutral."""
    import os

    env = os.environ if environ is None else environ
    return {f"env.{k}": digest(v) for k, v in sorted(env.items())
            if k.startswith("VLLM_") and k not in _LAYOUT_NEUTRAL_VLLM
            and not k.startswith(_LAYOUT_NEUTRAL_VLLM_PREFIXES)}


# Libraries whose version can change a kernel's weight layout (shuffles, packing) when vLLM picks it.
_KERNEL_LIBRARIES = ("torch", "triton", "flashinfer-python", "deep-gemm", "deep_gemm", "flash-attn", "vllm-flash-attn",
                     "nvidia-cutlass-dsl", "aiter", "intel-extension-for-pytorch", "zentorch")


def kernel_library_versions() -> str:
    import importlib.metadata as md

    found = []
    for name in _KERNEL_LIBRARIES:
        try:
            found.append(f"{name}={md.version(name)}")
        except md.PackageNotFoundError:
            continue
    return ",".join(found)


def chosen_kernels(model: torch.nn.Module) -> str:
    """The attention backends, attention implementations, quantization and MoE methods vLLM chose for this model
    (class names, sorted, deduplicated): the same config on another GPU or build can choose others."""
    seen: set[str] = set()
    for m in model.modules():
        backend = getattr(m, "attn_backend", None)
        if backend is not None:
            get_name = getattr(backend, "get_name", None)
            seen.add("attn:" + (str(get_name()) if callable(get_name) else type(backend).__name__))
        impl = getattr(m, "impl", None)
        if impl is not None and backend is not None:
            seen.add("impl:" + type(impl).__name__)
            if getattr(impl, "isa", None) is not None:
                seen.add(f"isa:{impl.isa}")
        qm = getattr(m, "quant_method", None)
        if qm is not None:
            seen.add("quant:" + type(qm).__name__)
            kernel = getattr(qm, "moe_kernel", None)
            if kernel is not None:
                seen.add("moe:" + type(kernel).__name__)
            backend_name = getattr(qm, "unquantized_backend", None)
            if backend_name is not None:
                seen.add(f"moe_backend:{backend_name}")
    return ",".join(sorted(seen))


def _capability(platform: Any) -> str:
    """GPU compute capability ("9.0"), "none" where the platform has none (CPU)."""
    try:
        cap = platform.get_device_capability()
    except Exception as e:  # a platform without the notion: named, so two such replicas still match each other
        return f"unknown({type(e).__name__})"
    return "none" if cap is None else f"{cap[0]}.{cap[1]}"


def _cpu_features() -> str:
    """The CPU's architecture and the features that pick vLLM's CPU kernels and its packed weight layout: vector
    ISA (AVX2, AVX-512, its bf16, AMX: sgl kernels) and the GEMM libraries (oneDNN, zentorch)."""
    import platform

    from vllm import _custom_ops as ops

    feats = {
        "avx2": torch.cpu._is_avx2_supported(),
        "avx512": torch.cpu._is_avx512_supported(),
        "avx512bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx": torch.cpu._is_amx_tile_supported(),
        "onednn": bool(getattr(ops, "_supports_onednn", False)),
        "zentorch": hasattr(torch.ops, "zentorch") and hasattr(torch.ops.zentorch, "zentorch_linear_unary"),
    }
    return platform.machine() + ":" + (",".join(k for k, v in feats.items() if v) or "plain")
