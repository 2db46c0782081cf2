"""Tensor discovery for any engine whose weights live in a `torch.nn.Module`: every tensor the module tree holds,
including those that kernels keep in Python closures (vLLM CPU's packed GEMM weights, for one). Pure torch."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["closure_items", "discover_tensors"]


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
                for var, v in closure_items(value):
                    add(f"{prefix}{attr}.{var}", v)
    return found


def closure_items(fn: object) -> list[tuple[str, object]]:
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
