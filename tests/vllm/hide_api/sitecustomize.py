"""Test helper, put on PYTHONPATH of an engine: a vLLM that lacks pieces the mx plugin uses, in all of its processes.

MX_TEST_HIDE_VLLM_API="module:attr[.attr],..." removes each attribute once `vllm.model_executor.model_loader` has been
imported. vLLM's own modules have bound what they use by then, so vLLM itself works; the plugin's later lookups fail
as they would on a vLLM release without those names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import os
import sys
from typing import Any

_HIDE = [x for x in os.environ.get("MX_TEST_HIDE_VLLM_API", "").split(",") if x]
_TRIGGER = "vllm.model_executor.model_loader"


def _hide() -> None:
    for item in _HIDE:
        mod, _, path = item.partition(":")
        obj: Any = importlib.import_module(mod)
        *parents, leaf = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        delattr(obj, leaf)


class _AfterTrigger(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != _TRIGGER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _hide()

        spec.loader.exec_module = exec_module
        return spec


if _HIDE:
    sys.meta_path.insert(0, _AfterTrigger())
