"""A file publisher or loader (`python -m runtime_hooks.engines.trtllm.cli`) plus its sidecar (`python -m sidecar run`):
real processes configured only through MX_* variables, as two containers of one pod."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from sidecar.lab.replica_procs import Proc
from tests.faults import FAST_ENV

# A stand-in for TensorRT-LLM's engine builder: records its argv, writes config.json and rank{N}.engine for the
# checkpoint's world size, or fails when FAKE_TRTLLM_FAIL is set. A real executable on PATH, run by the loader.
FAKE_TRTLLM_BUILD = '''#!{python}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
Path(os.environ["FAKE_TRTLLM_ARGV"]).write_text(json.dumps(args))
opt = {{args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}}
print("[TensorRT-LLM] fake trtllm-build: building", opt["--checkpoint_dir"], flush=True)
if os.environ.get("FAKE_TRTLLM_FAIL"):
    print("[TensorRT-LLM][ERROR] Assertion failed: out of memory while building rank 1", file=sys.stderr)
    sys.exit(7)
ckpt = json.loads(Path(opt["--checkpoint_dir"], "config.json").read_text())
out = Path(opt["--output_dir"])
out.mkdir(parents=True, exist_ok=True)
world = ckpt["mapping"]["world_size"]
skip = os.environ.get("FAKE_TRTLLM_SKIP_RANK")
for r in range(world):
    if str(r) != skip:
        (out / f"rank{{r}}.engine").write_bytes(b"fake engine " + str(r).encode())
(out / "config.json").write_text(json.dumps({{"version": "fake", "pretrained_config": ckpt}}))
print("[TensorRT-LLM] fake trtllm-build: done", flush=True)
'''


def write_fake_trtllm_build(bin_dir: Path, name: str = "trtllm-build") -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / name
    exe.write_text(FAKE_TRTLLM_BUILD.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


class FilesNode:
    """One pod: the publisher or loader process and, unless `sidecar=False`, its sidecar."""

    def __init__(self, name: str, args: list[str], work: Path, redis_url: str, extra_env: dict[str, str] | None = None,
                 sidecar: bool = True) -> None:
        self.name = name
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "MX_ZMQ_ADDRESS": f"ipc://{work}/{name}.sock",
                    "MX_REDIS_URL": redis_url, "MX_METRICS_PORT": "0", "MX_METRICS_HOST": "127.0.0.1", **FAST_ENV,
                    **(extra_env or {})}
        self.env.pop("MX_TP_SIZE", None)  # read from the manifest: a loader learns its rank count from the source
        self.sidecar = Proc(f"{name}-sidecar", [sys.executable, "-m", "sidecar", "run"], self.env, work) \
            if sidecar else None
        self.proc = Proc(name, [sys.executable, "-m", "runtime_hooks.engines.trtllm.cli", *args], self.env, work)

    def result(self, tag: str, timeout: float = 120) -> dict[str, Any]:
        return json.loads(self.proc.wait_for(rf"^{tag} (.*)", timeout).group(1))  # type: ignore[no-any-return]

    def exit_code(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        return "\n".join(self.proc.lines)

    def stop(self) -> None:
        if self.sidecar is not None:
            self.sidecar.stop()
        self.proc.stop()
