"""Packaging that does not fight the engine's image: ranges in pyproject.toml, exact versions in constraints.txt,
and an engine-side install that needs only the hook's dependencies (the vLLM venv check is in
tests/vllm/test_vllm_packaging.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.tooling import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SIDECAR_ONLY = ("redis", "uvloop", "prometheus_client", "xxhash", "uvicorn", "h11", "nixl_cu13", "nixl_cu12", "nixl")
# Run Python with the sidecar-only packages made unimportable, as in an engine image without the extras.
BLOCKER = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    f"        if name.split('.')[0] in {SIDECAR_ONLY!r}: raise ImportError(f'No module named {{name!r}} (blocked)')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def _requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in PYPROJECT["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return [r for r in reqs if canonicalize_name(r.name) != "mx-sidecar"]


def _constraints() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = Version(version)
    return out


def test_pyproject_declares_ranges_and_constraints_pin_every_dependency_to_a_version_inside_them():
    pins = _constraints()
    for req in _requirements():
        assert not [s for s in req.specifier if s.operator in ("==", "===")], f"{req}: exact pin in pyproject"
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt {name}=={pins[name]} vs {req}"


def test_the_engine_side_install_needs_only_the_hooks_dependencies():
    base = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["dependencies"]}
    assert base == {"msgspec", "pyzmq", "numpy", "safetensors"}
    extra = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["optional-dependencies"]["sidecar"]}
    assert extra == {"redis", "uvloop", "prometheus-client", "xxhash", "cryptography", "uvicorn"}


def test_the_hook_imports_without_the_sidecars_packages_and_the_daemon_says_what_to_install():
    code = BLOCKER + (
        "import runtime_hooks.adapter, runtime_hooks.hook, runtime_hooks.engines.torch_module, runtime_hooks.exposure\n"
        "import runtime_hooks.discovery, runtime_hooks.identity\n"
        "import runtime_hooks.engines.vllm.plugin, runtime_hooks.engines.vllm.adapter\n"
        "import runtime_hooks.files.buffers, runtime_hooks.files.errors, runtime_hooks.files.publisher\n"
        "import sidecar.contract.messages, sidecar.config\n"
        "try:\n    import redis\nexcept ImportError:\n    print('blocked ok')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and "blocked ok" in res.stdout, res.stderr
    run = BLOCKER + "import sys; from sidecar.__main__ import main; sys.exit(main(['run']))"
    res = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and "pip install 'mx-sidecar[sidecar," in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_make_installs_with_the_constraints_file():
    makefile = (ROOT / "Makefile").read_text()
    assert len(re.findall(r"pip install -q -c constraints.txt", makefile)) == 2
    assert "constraints_for.py constraints.txt" in makefile, "the vLLM venv keeps vLLM's own versions"
