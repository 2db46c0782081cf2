"""TensorRT-LLM at the file level: publish a checkpoint (or a model directory) from memory, receive it byte for byte
on a new node, and build the engine there, as in ModelExpress' original TRT-LLM example, on this project's sidecar.

    # source: hold the checkpoint's files in GPU memory (shared memory on CPU) and serve them until shutdown()
    pub = TrtllmSourcePublisher("/models/llama-70b/trtllm-ckpt", model_name="llama-70b")
    pub.initialize()

    # target: receive config.json + rank{N}.safetensors, verify SHA-256 per file, run trtllm-build
    engine_dir = TrtllmTargetLoader("llama-70b", output_dir="/tmp/mx_trtllm").load()
    from tensorrt_llm._tensorrt_engine import LLM      # TRT-LLM 1.x: the TensorRT-engine LLM
    llm = LLM(model=engine_dir)

A Hugging Face model directory (TRT-LLM's PyTorch backend, vLLM, any engine) takes the same path: the publisher
detects the form, the loader returns the received directory instead of building (`tensorrt_llm.LLM(model=dir)`).
Nothing here imports tensorrt_llm: the build runs whatever `trtllm-build` (MX_TRTLLM_BUILD_COMMAND) is on PATH.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from runtime_hooks.files.buffers import resolve_devices
from runtime_hooks.files.errors import FilesError
from runtime_hooks.files.layout import (
    FORMS,
    LayoutError,
    checkpoint_world_size,
    detect_form,
    list_files,
    plan_ranks,
)
from runtime_hooks.files.publisher import FilePublisher
from runtime_hooks.files.receiver import FileReceiver, ReceiveResult
from sidecar.config import Config

log = logging.getLogger("mx.trtllm")

__all__ = ["BuildFailed", "BuildOptions", "BuildToolMissing", "EngineBuildError", "TrtllmSourcePublisher",
           "TrtllmTargetLoader", "build_command", "build_engine", "load_trtllm"]


class EngineBuildError(FilesError):
    """The engine could not be built; the received checkpoint stays where it was written."""


class BuildToolMissing(EngineBuildError):
    pass


class BuildFailed(EngineBuildError):
    pass


def model_name_of(cfg: Config, given: str | None) -> str:
    name = given or cfg.trtllm_model_name or cfg.model_name
    if not name:
        raise FilesError("no model name: pass model_name, or set MX_TRTLLM_MODEL_NAME (or MX_MODEL_NAME)")
    return name


def safetensors_tensor_count(path: Path) -> int:
    """Tensors in a safetensors file, from its header alone (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 2 <= n <= 100 << 20:
            raise LayoutError(f"{path} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise LayoutError(f"{path}: safetensors header is not a JSON object")
    return sum(1 for k in header if k != "__metadata__")


# ------------------------------------------------------------------------------------------------ source


class TrtllmSourcePublisher:
    """Holds a TRT-LLM checkpoint's files (or a model directory's) in memory and serves them until `shutdown()`.

    Rank N of the checkpoint (`rank{N}.safetensors`) lives on device N (MX_TRTLLM_DEVICES); config.json and any other
    file live with rank 0. The sidecar next to this process (same MX_ZMQ_ADDRESS) publishes them.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike[str] | None = None, model_name: str | None = None,
                 form: str = "auto", ranks: int = 1, devices: str | None = None,
                 config: Config | None = None) -> None:
        self.cfg = config or Config.from_env()
        self.model_name = model_name_of(self.cfg, model_name)
        root = checkpoint_dir or self.cfg.trtllm_checkpoint_dir
        if not root:
            raise FilesError("no checkpoint directory: pass checkpoint_dir or set MX_TRTLLM_CHECKPOINT_DIR")
        self.checkpoint_dir = Path(root)
        self.form = detect_form(self.checkpoint_dir) if form == "auto" else form
        if self.form not in FORMS:
            raise FilesError(f"unknown form {form!r}: auto, {', '.join(FORMS)}")
        self.ranks = ranks
        self.devices_setting = devices or self.cfg.trtllm_devices
        self.publisher: FilePublisher | None = None

    def initialize(self, sidecar_timeout: float | None = None) -> None:
        files = list_files(self.checkpoint_dir)
        plan = plan_ranks(self.checkpoint_dir, self.form, files, self.ranks)
        log.info("Initializing source publisher for %s: %s, %d files on %d ranks", self.model_name, self.form,
                 len(files), len(plan))
        if self.form == "trtllm-checkpoint":
            meta = json.loads((self.checkpoint_dir / "config.json").read_text())
            mapping, quant = meta.get("mapping", {}), meta.get("quantization") or {}
            log.info("Config: architecture=%s dtype=%s world_size=%d tp_size=%s pp_size=%s quant_algo=%s "
                     "kv_cache_quant_algo=%s", meta.get("architecture"), meta.get("dtype"), len(plan),
                     mapping.get("tp_size", 1), mapping.get("pp_size", 1), quant.get("quant_algo"),
                     quant.get("kv_cache_quant_algo"))
            for r in range(len(plan)):
                f = self.checkpoint_dir / f"rank{r}.safetensors"
                log.info("Rank %d: %s holds %d tensors, %.2f GB", r, f.name, safetensors_tensor_count(f),
                         f.stat().st_size / 1e9)
        devices = resolve_devices(self.devices_setting, len(plan))
        self.publisher = FilePublisher(self.checkpoint_dir, self.model_name, self.form, plan, devices, self.cfg)
        outcomes = self.publisher.initialize(sidecar_timeout)
        log.info("Source publisher ready - serving %s via P2P (%s)", self.model_name, ", ".join(outcomes))

    @property
    def outcomes(self) -> list[str]:
        return list(self.publisher.outcomes) if self.publisher else []

    @property
    def total_bytes(self) -> int:
        return self.publisher.total_bytes if self.publisher else 0

    def shutdown(self) -> None:
        if self.publisher is not None:
            self.publisher.shutdown()
            self.publisher = None
        log.info("Source publisher for %s shut down", self.model_name)

    def __enter__(self) -> TrtllmSourcePublisher:
        self.initialize()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# ------------------------------------------------------------------------------------------------ build


@dataclass(frozen=True)
class BuildOptions:
    command: str = "trtllm-build"
    max_batch_size: int = 8
    max_input_len: int = 2048
    max_seq_len: int = 4096
    max_num_tokens: int = 0  # 0: not passed
    gemm_plugin: str = "auto"
    workers: int = 0  # 0: not passed
    extra_args: tuple[str, ...] = ()
    timeout: float = 7200.0

    @classmethod
    def from_config(cls, cfg: Config) -> BuildOptions:
        return cls(cfg.trtllm_build_command, cfg.trtllm_max_batch_size, cfg.trtllm_max_input_len,
                   cfg.trtllm_max_seq_len, cfg.trtllm_max_num_tokens, cfg.trtllm_gemm_plugin,
                   cfg.trtllm_build_workers, tuple(shlex.split(cfg.trtllm_build_args)), cfg.trtllm_build_timeout)


def build_command(opts: BuildOptions, checkpoint_dir: Path, engine_dir: Path,
                  executable: str | None = None) -> list[str]:
    cmd = [executable or opts.command, "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(engine_dir),
           "--max_batch_size", str(opts.max_batch_size), "--max_input_len", str(opts.max_input_len),
           "--max_seq_len", str(opts.max_seq_len)]
    if opts.max_num_tokens:
        cmd += ["--max_num_tokens", str(opts.max_num_tokens)]
    cmd += ["--gemm_plugin", opts.gemm_plugin]
    if opts.workers:
        cmd += ["--workers", str(opts.workers)]
    return cmd + list(opts.extra_args)


def build_engine(checkpoint_dir: Path, engine_dir: Path, opts: BuildOptions, log_path: Path) -> float:
    """Run trtllm-build on `checkpoint_dir`; check that it wrote config.json and rank{N}.engine for every rank.

    Returns the build time. Raises BuildToolMissing / BuildFailed; the checkpoint is never touched.
    """
    exe = shutil.which(opts.command)
    if exe is None:
        raise BuildToolMissing(
            f"{opts.command} not found on PATH (MX_TRTLLM_BUILD_COMMAND): install TensorRT-LLM <= 1.2 in this image "
            f"(its engine builder), or load with skip_build / --skip-build and build elsewhere; the received "
            f"checkpoint stays in {checkpoint_dir}")
    world = checkpoint_world_size(checkpoint_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*engine_dir.glob("rank*.engine"), engine_dir / "config.json"]:
        stale.unlink(missing_ok=True)  # a previous build's files must not pass for this one's
    cmd = build_command(opts, checkpoint_dir, engine_dir, exe)
    log.info("Building TRT-LLM engine from checkpoint...")
    log.info("Running: %s", shlex.join(cmd))
    t0 = time.monotonic()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(opts.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise BuildFailed(f"{opts.command} ran longer than MX_TRTLLM_BUILD_TIMEOUT={opts.timeout:.0f}s and was "
                              f"stopped; the received checkpoint stays in {checkpoint_dir}; output in {log_path}"
                              f"{_tail(log_path)}") from None
    dt = time.monotonic() - t0
    if rc != 0:
        raise BuildFailed(f"{opts.command} failed with code {rc} after {dt:.1f}s; the received checkpoint stays in "
                          f"{checkpoint_dir}; output in {log_path}{_tail(log_path)}")
    missing = [n for n in ["config.json", *(f"rank{r}.engine" for r in range(world))] if not (engine_dir / n).is_file()]
    if missing:
        raise BuildFailed(f"{opts.command} exited 0 but {engine_dir} lacks {', '.join(missing)}; the received "
                          f"checkpoint stays in {checkpoint_dir}; output in {log_path}{_tail(log_path)}")
    log.info("Engine built in %.1fs at %s", dt, engine_dir)
    return dt


def _tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            tail = list(deque(f, lines))
    except OSError:
        return ""
    return ("\nlast output lines:\n" + "".join(tail).rstrip()) if tail else ""


# ------------------------------------------------------------------------------------------------ target


class TrtllmTargetLoader:
    """Receives a live publisher's checkpoint (or model directory) through the sidecar beside this process, writes
    it byte for byte to `checkpoint_dir` (default `<output_dir>/checkpoint`), and builds the engine into
    `<output_dir>/engine` unless told not to. A model directory is returned as is (no build)."""

    def __init__(self, model_name: str | None = None, output_dir: str | os.PathLike[str] | None = None,
                 checkpoint_dir: str | os.PathLike[str] | None = None, build: BuildOptions | None = None,
                 devices: str | None = None, source_timeout: float | None = None,
                 config: Config | None = None) -> None:
        self.cfg = config or Config.from_env()
        self.model_name = model_name_of(self.cfg, model_name)
        self.output_dir = Path(output_dir or self.cfg.trtllm_output_dir)
        self.checkpoint_dir = Path(checkpoint_dir or self.cfg.trtllm_checkpoint_dir or self.output_dir / "checkpoint")
        self.engine_dir = self.output_dir / "engine"
        self.build = build or BuildOptions.from_config(self.cfg)
        self.receiver = FileReceiver(self.model_name, self.checkpoint_dir, self.cfg, devices, source_timeout)
        self.result: ReceiveResult | None = None
        self.build_s: float | None = None

    def load(self, skip_build: bool = False, sidecar_timeout: float | None = None) -> str:
        """Receive (and build). Returns the engine directory, or the received directory when `skip_build` or when
        the source published a model directory. The received files stay served until `shutdown()`."""
        log.info("Loading %s via P2P transfer into %s", self.model_name, self.checkpoint_dir)
        self.result = self.receiver.receive(sidecar_timeout)
        if self.result.form != "trtllm-checkpoint":
            log.info("Model directory saved to %s (run it with tensorrt_llm.LLM(model=...) or vLLM)",
                     self.checkpoint_dir)
            return str(self.checkpoint_dir)
        self._check_checkpoint()
        if skip_build:
            log.info("Checkpoint saved to %s", self.checkpoint_dir)
            return str(self.checkpoint_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.build_s = build_engine(self.checkpoint_dir, self.engine_dir, self.build,
                                    self.output_dir / "trtllm-build.log")
        return str(self.engine_dir)

    def _check_checkpoint(self) -> None:
        world = checkpoint_world_size(self.checkpoint_dir)
        assert self.result is not None
        got = len(self.receiver.layout.ranks) if self.receiver.layout else 0
        if world != got:
            raise FilesError(f"received config.json says world_size {world}, the source published {got} ranks")

    @property
    def transfer_stats(self) -> dict[str, float]:
        r = self.result
        if r is None:
            return {}
        return {"total_bytes": r.bytes, "total_time": r.receive_s, "bandwidth_gbps": r.bytes * 8 / 1e9 /
                max(r.receive_s, 1e-9)}

    def shutdown(self) -> None:
        """Stop serving the received files to later targets."""
        self.receiver.shutdown()


def load_trtllm(model_name: str | None = None, output_dir: str | os.PathLike[str] | None = None,
                skip_build: bool = False, config: Config | None = None) -> str:
    """One call: receive, verify, build; then stop serving. Returns the engine (or received) directory."""
    loader = TrtllmTargetLoader(model_name, output_dir, config=config)
    try:
        return loader.load(skip_build=skip_build)
    finally:
        loader.shutdown()
