"""The vLLM compatibility checks, without vLLM installed (the main suite); tests/vllm/ runs them against real vLLM."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from runtime_hooks.engines.vllm import compat as vllm_compat
from runtime_hooks.engines.vllm.compat import Need

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "runtime_hooks" / "engines" / "vllm"


def _checked() -> set[tuple[str, str]]:
    needs = (*vllm_compat.REGISTER_NEEDS, *vllm_compat.LOAD_NEEDS, *vllm_compat.CPU_LOAD_NEEDS, *vllm_compat.OPTIONAL,
             vllm_compat.CREATE_MODEL, vllm_compat.INITIALIZE_MODEL)
    out = set()
    for n in needs:
        out.add((n.module, n.attr.split(".")[0]))
        parent, _, leaf = n.module.rpartition(".")
        out.add((parent, leaf))  # `from vllm.x import y` where y is the module the need lives in
    return out


def test_every_vllm_name_the_plugin_imports_is_checked_by_the_compat_module():
    imported = set()
    for node in (n for f in sorted(PLUGIN_DIR.glob("*.py")) for n in ast.walk(ast.parse(f.read_text()))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
            imported |= {(node.module, a.name) for a in node.names}
    assert imported, "the plugin imports vLLM names"
    assert imported - _checked() == set(), "a vLLM name the plugin imports is not in vllm_compat's needs"


def test_a_missing_module_or_attribute_is_reported_by_its_full_name():
    present = Need("json", "dumps")
    assert vllm_compat.missing((present, Need("json", "no_such_thing"), Need("no_such_module_mx", "x"),
                                Need("json", "JSONDecoder.no_such_method"))) == [
        "json.no_such_thing", "no_such_module_mx.x", "json.JSONDecoder.no_such_method"]


@pytest.mark.parametrize(("version", "tested"), [("0.26.0", True), ("0.32.0", True), ("0.29.1+cpu", True),
                                                 ("0.25.1", False), ("0.33.0", False), ("1.0.0", False),
                                                 ("unknown", False)])
def test_versions_outside_the_tested_range_are_named_untested(version, tested):
    assert vllm_compat.is_tested(version) is tested


def test_without_vllm_register_logs_one_line_with_what_is_missing_and_registers_nothing(monkeypatch, caplog):
    pytest.importorskip("torch")
    try:  # not just "vllm": pytest's rootdir on sys.path makes tests/vllm a namespace package
        import vllm.model_executor  # noqa: F401

        pytest.skip("vLLM is installed here: tests/vllm covers the real registration")
    except ImportError:
        pass
    from runtime_hooks.engines.vllm import plugin as mx_vllm

    monkeypatch.setattr(mx_vllm, "_registered", False)
    with caplog.at_level(logging.WARNING, logger="mx.vllm"):
        mx_vllm.register()
        mx_vllm.register()
    lines = [r.getMessage() for r in caplog.records if r.name == "mx.vllm"]
    assert len(lines) == 1
    assert "vLLM not importable" in lines[0] and "register_model_loader" in lines[0]
    assert "not registered" in lines[0]
