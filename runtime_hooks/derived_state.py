"""The engine's non-tensor numeric state: what post-processing derived from the weights into plain Python numbers.

Checksums cover every tensor, but an engine also keeps numbers it computed from weights (vLLM's fp8 KV cache:
`_k_scale_float` from the `k_scale` Parameter) that no READ reaches. A target prepared on dummy weights holds
the dummy-derived values until something re-derives them. The hook reports this map beside the manifest; the
target's sidecar compares it with its source's (sealed in the record) before it releases the engine, and a
difference means a storage load, with the attribute names in the log.
"""

from __future__ import annotations

import math

import torch

__all__ = ["module_numbers", "number_text"]

# Module attributes that are not derived from weights and may differ between two processes of one build.
_NOT_DERIVED = frozenset({"training"})


def number_text(v: bool | int | float) -> str:
    """Exact text of a number: float.hex for floats (every bit, NaN and infinities included)."""
    if isinstance(v, bool):
        return "bool:" + str(v)
    if isinstance(v, int):
        return "int:" + str(v)
    return "float:" + ("nan" if math.isnan(v) else v.hex())


def module_numbers(model: torch.nn.Module) -> dict[str, str]:
    """`module.path.attribute` -> number_text for every plain bool/int/float attribute of every submodule."""
    out: dict[str, str] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for key, value in vars(module).items():
            if key in _NOT_DERIVED or type(value) not in (bool, int, float):
                continue
            out[f"{prefix}.{key}" if prefix else key] = number_text(value)
    return out

