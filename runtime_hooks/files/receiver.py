"""Files through the hook protocol, target side: a receiver with no files rebuilds a directory byte for byte from
a live publisher (runtime_hooks/files/publisher.py).

Target flow: read the source's record from Redis (`read_source_records`, the one place that reads records), rebuild
the layout and fingerprint from it, allocate buffers of those sizes, run the normal hook flow (the sidecar picks the
source by fingerprint and READs), then, inside `after_receive`, hash every file and write it to a staging folder;
only when every file of every rank matched the source's SHA-256 do the files move into place. A target has no
storage to fall back to: a `load_from_storage` verdict is a clear error, never a hang.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime_hooks.exposure import ModelIdentity
from runtime_hooks.files.buffers import alloc_file_buffer, host_chunks, resolve_devices, usable_mem_types
from runtime_hooks.files.errors import FilesError, SidecarVanished, SourceNotFound, TransferFailed
from runtime_hooks.files.install import install, make_staging
from runtime_hooks.files.layout import FileSpec, LayoutError, SourceLayout, files_identity, layout_from_record
from runtime_hooks.files.ranks import close_hooks, run_hooks
from runtime_hooks.hook import RankHook
from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.messages import SourceRecord
from sidecar.coordinator import Coordinator
from sidecar.errors import CoordinatorUnavailable
from sidecar.redis_client import connect as connect_redis

log = logging.getLogger("mx.files")

_QUARANTINE: list[dict[str, torch.Tensor]] = []  # buffers a vanished sidecar may still write: never freed

__all__ = ["FileReceiver", "FileTargetAdapter", "RankStats", "ReceiveResult", "layouts_of", "read_source_records",
           "wait_for_source"]


async def read_source_records(coord: Coordinator, model: str) -> list[SourceRecord]:
    """Every live source record announcing `model`, each opened through the coordinator's verified reader (with
    MX_AUTH_KEY_FILE, a record not sealed with the deployment key is refused). The one place a files target reads
    records."""
    return [c.record for c in await coord.sources_of_model(model)]


def layouts_of(records: list[SourceRecord], model: str) -> list[SourceLayout]:
    """File-level layouts among the records, one per fingerprint, counting the live sources of each."""
    found: dict[str, SourceLayout] = {}
    counts: dict[str, int] = {}
    for rec in records:
        try:
            lay = layout_from_record(rec, model)
        except LayoutError as e:
            log.warning("ignoring source %s of %s: %s", rec.replica, model, e)
            continue
        if lay is None:
            log.debug("source %s announces %s but is not a file-level publication of it", rec.replica, model)
            continue
        found.setdefault(lay.fingerprint, lay)
        counts[lay.fingerprint] = counts.get(lay.fingerprint, 0) + 1
    out = [SourceLayout(x.model, x.form, x.fingerprint, x.mem_type, x.ranks, counts[fp]) for fp, x in found.items()]
    out.sort(key=lambda x: (-x.replicas, x.fingerprint))
    return out


Choose = Callable[[list[SourceLayout]], "SourceLayout | None"]


def wait_for_source(cfg: Config, model: str, timeout: float, mem_types: set[str],
                    choose: Choose | None = None) -> SourceLayout:
    """Poll Redis until a file-level source of `model` that this process can receive from is live (and, with
    `choose`, one it picks among those: the compile cache takes only its own key)."""
    return asyncio.run(_wait_for_source(cfg, model, timeout, mem_types, choose))


async def _wait_for_source(cfg: Config, model: str, timeout: float, mem_types: set[str],
                           choose: Choose | None) -> SourceLayout:
    keys = Keyring.from_file(cfg.auth_key_file)
    if not keys.enabled:
        log.warning("no MX_AUTH_KEY_FILE: source records are read UNAUTHENTICATED (the SHA-256s then protect against "
                    "corruption, not against whoever can write Redis)")
    refused: list[str] = []
    reported: set[str] = set()
    coord = Coordinator(connect_redis(cfg), cfg.redis_prefix, f"files-reader-{os.getpid()}", cfg.node_name,
                        cfg.source_ttl, cfg.max_message_bytes, cfg.max_metadata_bytes, keys,
                        lambda who, why: refused.append(f"{who} ({why})"), cfg.topology)
    log.info("Querying for source model: %s", model)
    t0 = time.monotonic()
    next_note = t0 + 10
    unusable: set[str] = set()
    redis_error = ""
    try:
        while True:
            try:
                layouts = layouts_of(await read_source_records(coord, model), model)
                redis_error = ""
            except CoordinatorUnavailable as e:
                layouts = []
                if not redis_error:
                    log.warning("cannot read sources from Redis (%s); retrying", e)
                redis_error = str(e)
            new = sorted(set(refused) - reported)
            if new:  # logged once per record, not once per poll
                log.warning("refused %d source records that are not sealed with this deployment key: %s",
                            len(new), ", ".join(new[:3]))
                reported.update(new)
            refused.clear()
            usable = [x for x in layouts if x.mem_type in mem_types]
            unusable.update(x.mem_type for x in layouts if x.mem_type not in mem_types)
            picked = (choose(usable) if choose is not None else usable[0]) if usable else None
            if picked is not None:
                lay = picked
                if len(usable) > 1 and choose is None:
                    log.warning("%d different file sets are published as %s; taking the one with the most live "
                                "sources (%s, %d)", len(usable), model, lay.fingerprint[:12], lay.replicas)
                log.info("Found source with %d workers (%s, %d files, %.2f GB, %s memory)", len(lay.ranks),
                         lay.form, lay.files, lay.total_bytes / 1e9, "GPU" if lay.mem_type == "VRAM" else "host")
                return lay
            now = time.monotonic()
            if now - t0 >= timeout:
                why = ""
                if unusable:
                    why = (f" (a source serves it from {'GPU' if 'VRAM' in unusable else 'host'} memory, which this "
                           f"loader cannot receive into with MX_TRTLLM_DEVICES={cfg.trtllm_devices})")
                elif redis_error:
                    why = f" (Redis: {redis_error})"
                elif reported:
                    why = f" ({len(reported)} records refused: not sealed with this deployment key)"
                raise SourceNotFound(f"Source not found for {model} after {timeout:.0f}s{why}")
            if now >= next_note:
                log.info("Source not ready, waiting... (%ds / %ds)", now - t0, timeout)
                next_note = now + 10
            await asyncio.sleep(min(cfg.poll_interval * 4, max(timeout - (now - t0), 0.01)))
    finally:
        await coord.close()


class FileTargetAdapter:
    """EngineAdapter of a target rank: buffers sized from the source's record. After the receive (the sidecar has
    checked its own checksums), every file is hashed and written to the staging folder in one pass; a SHA-256 that
    differs from the source's fails the rank, and nothing reaches the destination."""

    def __init__(self, model: str, form: str, rank: int, ranks: int, specs: tuple[FileSpec, ...], device: str,
                 staging: Path, waited_from: float) -> None:
        self.rank = rank
        self.model = model
        self.specs = specs
        self.staging = staging
        self._identity = files_identity(model, form, rank, ranks)
        self._tensors = {s.entry_name: alloc_file_buffer(s.size, device) for s in specs}
        self._waited_from = waited_from
        self.t_prepare: float | None = None
        self.t_received: float | None = None
        self.t_written: float | None = None
        self.error: FilesError | None = None

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.specs)

    def identity(self) -> ModelIdentity:
        return self._identity

    def discover_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

    def prepare_target(self) -> None:
        self.t_prepare = time.monotonic()

    def load_from_storage(self) -> None:
        if self.t_prepare is not None:
            self.error = TransferFailed(
                f"transfer failed: no source delivered verified bytes of {self.model} (see the sidecar's log: "
                "source_failed / verify_failed / refused_layout); nothing was written")
        else:
            self.error = SourceNotFound(
                f"Source not found for {self.model} after {time.monotonic() - self._waited_from:.0f}s (the sidecar "
                "found no live source, or none answered this loader: a files target has no storage to load from)")
        raise self.error

    def after_receive(self) -> None:
        self.t_received = time.monotonic()
        for s in self.specs:
            dest = self.staging / s.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with open(dest, "xb") as f:  # a fresh folder of ours: nothing may already be there
                for mv in host_chunks(self._tensors[s.entry_name]):
                    h.update(mv)
                    f.write(mv)
                f.flush()
                os.fsync(f.fileno())
            if h.hexdigest() != s.sha256:
                self.error = TransferFailed(
                    f"transfer failed: rank {self.rank} {s.path}: SHA-256 {h.hexdigest()} != the source's {s.sha256}; "
                    "nothing was written")
                raise self.error
        self.t_written = time.monotonic()
        log.info("rank %d: SHA-256 of %d files match the source's; staged %.2f GB in %.2fs", self.rank,
                 len(self.specs), self.nbytes / 1e9, self.t_written - self.t_received)

    def derived_state(self) -> dict[str, str]:
        return {}  # files: every byte is in the tensors

    def reset_for_retry(self) -> None:
        """Nothing reached the staging folder before the verdict; the next attempt overwrites every buffer."""


@dataclass
class RankStats:
    rank: int
    files: int
    bytes: int
    receive_s: float  # prepare_target -> all bytes landed and the sidecar verified its checksums
    hash_write_s: float


@dataclass
class ReceiveResult:
    path: str
    model: str
    form: str
    files: int
    bytes: int
    query_s: float
    receive_s: float
    hash_write_s: float
    total_s: float
    ranks: list[RankStats] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        """Transfer rate in GB/s (1e9 B) over the receive window."""
        return self.bytes / 1e9 / max(self.receive_s, 1e-9)


class FileReceiver:
    """Rebuilds a live publisher's files in `dest`, byte for byte, through the sidecar beside this process."""

    def __init__(self, model_name: str, dest: str | os.PathLike[str], config: Config | None = None,
                 devices: str | None = None, source_timeout: float | None = None,
                 choose: Choose | None = None) -> None:
        self.cfg = config or Config.from_env()
        self.model_name = model_name
        self.dest = Path(dest)
        self.devices_setting = devices or self.cfg.trtllm_devices
        self.source_timeout = source_timeout or self.cfg.trtllm_source_timeout
        self.choose = choose
        self.layout: SourceLayout | None = None
        self.adapters: list[FileTargetAdapter] = []
        self.hooks: list[RankHook] = []
        self.result: ReceiveResult | None = None

    def receive(self, sidecar_timeout: float | None = None) -> ReceiveResult:
        t0 = time.monotonic()
        lay = self.layout = wait_for_source(self.cfg, self.model_name, self.source_timeout,
                                            usable_mem_types(self.devices_setting), self.choose)
        t_found = time.monotonic()
        devices = resolve_devices(self.devices_setting, len(lay.ranks), lay.mem_type)
        self.dest.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dest).free
        if free < lay.total_bytes:
            raise FilesError(f"{self.dest} has {free / 1e9:.2f} GB free, the files of {self.model_name} need "
                             f"{lay.total_bytes / 1e9:.2f} GB")
        staging = make_staging(self.dest)
        try:
            for r, specs in enumerate(lay.ranks):
                if devices[r].startswith("cuda"):
                    torch.cuda.set_device(devices[r])
                self.adapters.append(FileTargetAdapter(self.model_name, lay.form, r, len(lay.ranks), specs,
                                                       devices[r], staging, t0))
                log.info("Receiving rank %d: %d tensors", r, len(specs))
            self.hooks = [RankHook(a, config=self.cfg) for a in self.adapters]
            try:
                outcomes = run_hooks(self.hooks, devices, sidecar_timeout,
                                      orphan_grace=sidecar_timeout or self.cfg.sidecar_timeout)
            except SidecarVanished as e:
                # Its READs may still land: these buffers stay allocated, never reused, while this process lives.
                _QUARANTINE.extend(a.discover_tensors() for a in self.adapters)
                log.error("%s; the receive buffers (%.2f GB) stay allocated until this process exits", e,
                          sum(a.nbytes for a in self.adapters) / 1e9)
                self.adapters = []
                self.shutdown()
                raise TransferFailed(f"transfer failed: {e}") from e
            except BaseException as e:
                err = self._failure(e)
                self.shutdown()
                raise err from e
            if any(o != "received" for o in outcomes):  # cannot happen: a files target has no other way to be ready
                raise TransferFailed(f"ranks ended {outcomes}, not received")
            self._log_rates()
            stale = install(staging, self.dest, self.model_name, {s.path: s.sha256 for a in self.adapters
                                                                   for s in a.specs})
            if stale:
                log.info("removed %d files an earlier receive wrote that %s no longer has (e.g. %s)", len(stale),
                         self.model_name, stale[0])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        t_end = time.monotonic()
        starts = [a.t_prepare or t_found for a in self.adapters]
        landed = [a.t_received or t_end for a in self.adapters]
        written = [a.t_written or t_end for a in self.adapters]
        self.result = ReceiveResult(
            str(self.dest), self.model_name, lay.form, lay.files, lay.total_bytes, t_found - t0,
            max(landed) - min(starts), max(written) - max(landed), t_end - t0,
            [RankStats(a.rank, len(a.specs), a.nbytes, (a.t_received or t_end) - (a.t_prepare or t_found),
                       (a.t_written or t_end) - (a.t_received or t_end)) for a in self.adapters], devices)
        log.info("Verified SHA-256 of %d files (%.2f GB) and wrote them to %s", lay.files, lay.total_bytes / 1e9,
                 self.dest)
        return self.result

    def _failure(self, e: BaseException) -> FilesError:
        errors = [a.error for a in self.adapters if a.error is not None]
        for err in errors:
            if isinstance(err, TransferFailed):
                return err
        return errors[0] if errors else TransferFailed(f"transfer failed: {e}; nothing was written")

    def _log_rates(self) -> None:
        first = min(a.t_prepare or 0.0 for a in self.adapters)
        last = max(a.t_received or 0.0 for a in self.adapters)
        total = 0
        for a in self.adapters:
            dt = max((a.t_received or 0.0) - (a.t_prepare or 0.0), 1e-9)
            total += a.nbytes
            log.info("Rank %d: Received %.2f GB in %.2fs (%.1f Gbps)", a.rank, a.nbytes / 1e9, dt,
                     a.nbytes * 8 / dt / 1e9)
        dt = max(last - first, 1e-9)
        log.info("Transfer complete: %.2f GB total in %.2fs (%.1f Gbps)", total / 1e9, dt, total * 8 / dt / 1e9)

    def shutdown(self) -> None:
        """Stop serving the received files (the hooks close; the sidecar withdraws once it notices)."""
        close_hooks(self.hooks)
        self.hooks, self.adapters = [], []
