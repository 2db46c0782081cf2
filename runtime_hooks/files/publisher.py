"""Files through the hook protocol, source side: a publisher holds a directory's files in memory and serves them.

Each rank is an ordinary engine rank to the sidecar: its "tensors" are the exact bytes of its files (one uint8 1-D
tensor per file, header included, never re-serialised), in POSIX shared memory on CPU and in GPU memory (CUDA IPC)
on GPU, named `<path>@sha256:<digest>` (runtime_hooks/files/layout.py). The sidecar beside each process does the
rest exactly as for vLLM: roles, NIXL, checksums, publication. The target side is runtime_hooks/files/receiver.py.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from runtime_hooks.exposure import ModelIdentity
from runtime_hooks.files.buffers import alloc_file_buffer, digest_of, read_file_into
from runtime_hooks.files.errors import TransferFailed
from runtime_hooks.files.layout import FileSpec, LayoutError, files_identity
from runtime_hooks.files.ranks import close_hooks, run_hooks
from runtime_hooks.hook import Outcome, RankHook
from sidecar.config import Config

log = logging.getLogger("mx.files")

__all__ = ["FilePublisher", "FileSourceAdapter"]


class FileSourceAdapter:
    """EngineAdapter of a publisher rank: the files are read (and hashed) before the hook exists, so the fingerprint
    carries their digests. `load_from_storage` is then a no-op, unless a receive overwrote the buffers."""

    def __init__(self, root: Path, identity: ModelIdentity, specs: list[FileSpec],
                 tensors: dict[str, torch.Tensor]) -> None:
        self._root = root
        self._identity = identity
        self._specs = specs
        self._tensors = tensors
        self._touched = False

    @classmethod
    def load(cls, root: Path, model: str, form: str, rank: int, ranks: int, paths: list[str],
             device: str) -> FileSourceAdapter:
        specs: list[FileSpec] = []
        tensors: dict[str, torch.Tensor] = {}
        for p in paths:
            f = root / p
            t = alloc_file_buffer(f.stat().st_size, device)
            spec = FileSpec(p, t.numel(), read_file_into(f, t))
            specs.append(spec)
            tensors[spec.entry_name] = t
        return cls(root, files_identity(model, form, rank, ranks), specs, tensors)

    @property
    def specs(self) -> list[FileSpec]:
        return self._specs

    def identity(self) -> ModelIdentity:
        return self._identity

    def discover_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

    def prepare_target(self) -> None:
        """Another publisher of the same files is live: the sidecar overwrites ours with its (equal) bytes."""
        self._touched = True

    def load_from_storage(self) -> None:
        if not self._touched:
            return  # read and hashed at construction
        for s in self._specs:
            got = read_file_into(self._root / s.path, self._tensors[s.entry_name])
            if got != s.sha256:
                raise LayoutError(f"{self._root / s.path} changed on disk since it was published")
        self._touched = False

    def after_receive(self) -> None:
        for s in self._specs:
            got = digest_of(self._tensors[s.entry_name])
            if got != s.sha256:
                raise TransferFailed(f"{s.path}: received SHA-256 {got} != {s.sha256}")
        self._touched = False

    def derived_state(self) -> dict[str, str]:
        return {}  # files: every byte is in the tensors

    def reset_for_retry(self) -> None:
        self._touched = True


class FilePublisher:
    """Serves a directory's files, rank by rank, through the hook protocol and the sidecar beside this process.

    `initialize()` reads every file into memory (one thread per rank), starts one RankHook per rank and returns when
    the sidecar has given every rank its verdict; the files are then served until `shutdown()`.
    """

    def __init__(self, root: str | os.PathLike[str], model_name: str, form: str, plan: list[list[str]],
                 devices: list[str], config: Config | None = None) -> None:
        self.root = Path(root)
        self.model_name = model_name
        self.form = form
        self.plan = plan
        self.devices = devices
        self.cfg = config or Config.from_env()
        self.adapters: list[FileSourceAdapter] = []
        self.hooks: list[RankHook] = []
        self.outcomes: list[Outcome] = []
        self.load_s = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(s.size for a in self.adapters for s in a.specs)

    def load_files(self) -> None:
        t0 = time.monotonic()
        n = len(self.plan)

        def one(rank: int) -> FileSourceAdapter:
            log.info("Loading rank %d files from %s onto %s", rank, self.root, self.devices[rank])
            if self.devices[rank].startswith("cuda"):
                torch.cuda.set_device(self.devices[rank])
            a = FileSourceAdapter.load(self.root, self.model_name, self.form, rank, n, self.plan[rank],
                                       self.devices[rank])
            log.info("Rank %d: %d files, %.2f GB", rank, len(a.specs), sum(s.size for s in a.specs) / 1e9)
            return a

        with ThreadPoolExecutor(n, thread_name_prefix="mx-files-load") as pool:
            self.adapters = list(pool.map(one, range(n)))
        self.load_s = time.monotonic() - t0
        log.info("Total: %.2f GB across %d ranks, read and hashed in %.2fs", self.total_bytes / 1e9, n, self.load_s)

    def initialize(self, sidecar_timeout: float | None = None) -> list[Outcome]:
        if not self.adapters:
            self.load_files()
        self.hooks = [RankHook(a, config=self.cfg) for a in self.adapters]
        self.outcomes = run_hooks(self.hooks, self.devices, sidecar_timeout)
        if any(o == "loaded_without_sidecar" for o in self.outcomes):
            log.warning("no sidecar answered: the files are held but nobody serves them (start `mx-sidecar run` with "
                        "the same MX_ZMQ_ADDRESS)")
        return self.outcomes

    def shutdown(self) -> None:
        close_hooks(self.hooks)
        self.hooks, self.adapters = [], []
