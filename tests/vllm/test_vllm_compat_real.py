"""The compatibility module against the installed vLLM (in-process, no engine started)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

# Not just "vllm": without vLLM installed, pytest's rootdir on sys.path makes tests/vllm a namespace package.
pytest.importorskip("vllm.model_executor")
pytestmark = pytest.mark.vllm

from runtime_hooks.engines.vllm import compat as vllm_compat  # noqa: E402
from runtime_hooks.engines.vllm import plugin as mx_vllm  # noqa: E402


def test_this_vllm_is_in_the_tested_range_and_has_everything_the_plugin_uses():
    assert vllm_compat.is_tested(vllm_compat.version()), vllm_compat.version()
    assert vllm_compat.missing_for_register() == []
    assert vllm_compat.missing_for_load() == []


def test_without_create_model_the_model_is_built_by_initialize_model_as_vllm_0_26_does(monkeypatch):
    from vllm.model_executor.model_loader import base_loader, utils

    monkeypatch.delattr(base_loader.BaseModelLoader, "create_model", raising=False)  # absent in 0.26 anyway
    calls = []
    monkeypatch.setattr(utils, "initialize_model", lambda **kw: calls.append(kw) or "model")
    loader = SimpleNamespace()  # what a loader without create_model looks like to the compat call
    assert vllm_compat.create_model(loader, "vc", "mc", "p") == "model"
    assert calls == [{"vllm_config": "vc", "model_config": "mc", "prefix": "p"}]


def test_with_create_model_the_loader_builds_the_model(monkeypatch):
    loader = SimpleNamespace(create_model=lambda **kw: ("built", kw["prefix"]))
    assert vllm_compat.create_model(loader, "vc", "mc", "x") == ("built", "x")


def _fresh_loader(monkeypatch: pytest.MonkeyPatch):
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    monkeypatch.setattr(mx_vllm, "_registered", False)
    mx_vllm.register()
    return get_model_loader(LoadConfig(load_format="mx"))


def test_a_vllm_lacking_the_dummy_loader_still_accepts_mx_and_hands_the_load_to_its_default_loader(
        monkeypatch, caplog):
    from vllm.model_executor.model_loader import dummy_loader

    monkeypatch.delattr(dummy_loader, "DummyModelLoader")
    loader = _fresh_loader(monkeypatch)
    assert type(loader) is mx_vllm.loader_class()
    model = torch.nn.Linear(2, 2)
    calls = []
    monkeypatch.setattr(loader.storage_loader, "load_model", lambda **kw: calls.append(kw) or model)
    hooks = mx_vllm.VllmHooks()  # this test's outcomes alone
    monkeypatch.setattr(loader, "hooks", hooks)
    vllm_config = SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, data_parallel_size=1),
        compilation_config=SimpleNamespace(static_forward_context={}), device_config=SimpleNamespace(device="cpu"))
    with caplog.at_level(logging.WARNING, logger="mx.vllm"):
        got = loader.load_model(vllm_config=vllm_config, model_config=SimpleNamespace(), prefix="")
    assert got is model and len(calls) == 1
    [line] = [r.getMessage() for r in caplog.records if r.name == "mx.vllm" and r.levelno >= logging.WARNING]
    assert f"vLLM {vllm_compat.version()}" in line
    assert "vllm.model_executor.model_loader.dummy_loader.DummyModelLoader" in line
    assert "default loader reads storage" in line and "VllmConfig" not in line
    assert hooks.outcome(0) == "loaded_by_vllm"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _register_fresh(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    got = _Records()
    logging.getLogger("mx.vllm").addHandler(got)
    monkeypatch.setattr(logging.getLogger("mx.vllm"), "level", logging.INFO)
    monkeypatch.setattr(mx_vllm, "_registered", False)
    try:
        mx_vllm.register()
    finally:
        logging.getLogger("mx.vllm").removeHandler(got)
    return got.lines


def test_where_nothing_else_holds_mx_both_mx_sidecar_and_the_mx_alias_are_ours(monkeypatch):
    from vllm.model_executor import model_loader

    monkeypatch.delitem(model_loader._LOAD_FORMAT_TO_MODEL_LOADER, "mx", raising=False)
    lines = _register_fresh(monkeypatch)
    registry = model_loader._LOAD_FORMAT_TO_MODEL_LOADER
    assert registry["mx-sidecar"] is registry["mx"] is mx_vllm.loader_class()
    assert any("mx-sidecar and mx (alias) registered" in line for line in lines)


def test_an_mx_alias_held_by_another_project_is_left_to_it_and_the_log_says_to_use_mx_sidecar(monkeypatch):
    from vllm.model_executor import model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class ModelExpressLoader(BaseModelLoader):  # stands for ModelExpress' registration of its `mx` alias
        def download_model(self, model_config):  # type: ignore[no-untyped-def]
            pass

        def load_weights(self, model, model_config):  # type: ignore[no-untyped-def]
            pass

    monkeypatch.setitem(model_loader._LOAD_FORMAT_TO_MODEL_LOADER, "mx", ModelExpressLoader)
    lines = _register_fresh(monkeypatch)
    registry = model_loader._LOAD_FORMAT_TO_MODEL_LOADER
    assert registry["mx"] is ModelExpressLoader
    assert registry["mx-sidecar"] is mx_vllm.loader_class()
    assert any("held by" in line and "ModelExpressLoader" in line and "--load-format mx-sidecar" in line
               for line in lines)
