"""Where the deploy/monitoring tests find their tools, and how they render the manifests.

kubectl, prometheus and promtool come from `make tools` (Debian packages unpacked into .tools, see
tests/tools/fetch.sh); kubernetes-validate and hadolint from the venv (dev extra). Under `make test`
(MX_REQUIRE_TOOLS=1) a missing tool fails the test; in a bare checkout it skips with the command to run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("vllm", "trtllm")


def _missing(what: str, fix: str) -> None:
    msg = f"{what} not found: {fix}"
    if os.environ.get("MX_REQUIRE_TOOLS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def tool(name: str) -> str:
    """A binary from `make tools` (kubectl, prometheus, promtool)."""
    path = Path(os.environ.get("MX_TOOLS", ROOT / ".tools" / "bin")) / name
    if not path.exists():
        _missing(str(path), "run `make tools`")
    return str(path)


def venv_tool(name: str) -> str:
    """A console script of the venv running the tests (kubernetes-validate, hadolint)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        _missing(str(path), "install the dev extra (`make venv`)")
    return str(path)


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


def kustomize(path: Path) -> str:
    res = run([tool("kubectl"), "kustomize", str(path)])
    assert res.returncode == 0, f"kubectl kustomize {path} failed:\n{res.stderr}"
    return res.stdout


def compose(tmp: Path, overlay: str, components: tuple[str, ...]) -> Path:
    """A throwaway kustomization: an overlay plus optional components, as a user would write it."""
    tmp.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(DEPLOY, tmp)
    comps = "".join(f"\n  - {rel}/components/{c}" for c in components)
    (tmp / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel}/overlays/{overlay}\n" + (f"components:{comps}\n" if components else ""))
    return tmp


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def config_maps(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """ConfigMaps by their generator name (kustomize appends a content hash: mx-sidecar-5cb459mkfd)."""
    return {o["metadata"]["name"].rsplit("-", 1)[0]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
