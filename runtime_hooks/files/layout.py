"""File-level publication: which files a rank holds, how they appear in a manifest, and how a target that has
no files rebuilds the same layout (and fingerprint) from a source's record.

A rank's tensors are the exact bytes of its files, one uint8 1-D tensor per file, named
`<relative path>@sha256:<hex digest>`. The digest is part of the name, hence of the fingerprint and of the
source's record: a target computes the fingerprint from the record alone, sizes its buffers from it, and checks
every received file against its digest before the file appears on disk.

Two forms share this code: `trtllm-checkpoint` (`rank{N}.safetensors` on rank N, every other file on rank 0) and
`model-dir` (any directory, e.g. a Hugging Face model: shards spread over the ranks by size, the rest on rank 0).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from runtime_hooks.exposure import ModelIdentity, layout_fingerprint
from sidecar.contract.messages import SourceRecord, replica_fingerprint

FORMS = ("trtllm-checkpoint", "model-dir")
FILES_REVISION = "mx-files/1"
SHA_TAG = "@sha256:"
MAX_PATH_CHARS = 512
_RANK_FILE = re.compile(r"rank(\d+)\.safetensors")
_SHARD_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DEVICE_TYPE = {"DRAM": "cpu", "VRAM": "cuda"}


class LayoutError(ValueError):
    """A directory or a record that does not describe a usable set of files."""


@dataclass(frozen=True)
class FileSpec:
    path: str  # relative, '/'-separated, checked by check_relpath
    size: int
    sha256: str

    @property
    def entry_name(self) -> str:
        return f"{self.path}{SHA_TAG}{self.sha256}"


def check_relpath(path: str) -> str:
    """A path that stays inside the directory it is joined to, or LayoutError (records may be forged)."""
    if not path or len(path) > MAX_PATH_CHARS or "\\" in path or path.startswith("/"):
        raise LayoutError(f"file path {path[:80]!r} is not a relative path")
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        raise LayoutError(f"file path {path[:80]!r} has control characters")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0].startswith(".mx-"):  # staging folders, markers
        raise LayoutError(f"file path {path[:80]!r} has an empty, '.', '..' or reserved component")
    return path


def parse_entry_name(name: str) -> tuple[str, str]:
    path, tag, digest = name.rpartition(SHA_TAG)
    if not tag or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise LayoutError(f"entry {name[:80]!r} is not `<path>{SHA_TAG}<64 hex>`")
    return check_relpath(path), digest


def files_identity(model: str, form: str, rank: int, ranks: int) -> ModelIdentity:
    if form not in FORMS:
        raise LayoutError(f"unknown form {form!r}; one of {', '.join(FORMS)}")
    return ModelIdentity(model, FILES_REVISION, "uint8", rank, ranks, "none", (("form", form),))


def rank_fingerprint(model: str, form: str, rank: int, specs: list[FileSpec], ranks: int, device_type: str) -> str:
    """What RankHook computes for uint8 tensors of these sizes on `device_type` (see exposure.compute_fingerprint)."""
    layout = [(s.entry_name, "uint8", [s.size]) for s in specs]
    return layout_fingerprint(files_identity(model, form, rank, ranks), {device_type}, layout)


# ------------------------------------------------------------------------------------------------ source side


def list_files(root: Path) -> list[str]:
    """Every regular file under `root` (symlinks followed, as in a Hugging Face cache snapshot), sorted;
    hidden files and directories (`.git`, `.cache`, ...) are left out."""
    if not root.is_dir():
        raise LayoutError(f"{root} is not a directory")
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or not p.is_file():
            continue
        out.append(check_relpath(rel))
    if not out:
        raise LayoutError(f"{root} holds no files")
    return out


def checkpoint_world_size(root: Path) -> int:
    """Ranks of a TRT-LLM checkpoint: config.json's `mapping.world_size`, else tp_size x pp_size (default 1)."""
    try:
        meta = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise LayoutError(f"{root}/config.json is not a readable TRT-LLM checkpoint config: {e}") from None
    mapping = meta.get("mapping") if isinstance(meta, dict) else None
    mapping = mapping if isinstance(mapping, dict) else {}
    n = mapping.get("world_size")
    if n is None:
        n = mapping.get("tp_size", 1) * mapping.get("pp_size", 1) if all(
            isinstance(mapping.get(k, 1), int) for k in ("tp_size", "pp_size")) else None
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4096:
        raise LayoutError(f"{root}/config.json: mapping.world_size {n!r} is not a rank count")
    return n


def detect_form(root: Path) -> str:
    """`trtllm-checkpoint` when the directory holds rank0.safetensors and a config.json with a `mapping` or
    `architecture` key (TRT-LLM's checkpoint config), else `model-dir`."""
    cfg = root / "config.json"
    if (root / "rank0.safetensors").is_file() and cfg.is_file():
        try:
            meta = json.loads(cfg.read_text())
        except (OSError, ValueError):
            return "model-dir"
        if isinstance(meta, dict) and ("mapping" in meta or "architecture" in meta):
            return "trtllm-checkpoint"
    return "model-dir"


def plan_ranks(root: Path, form: str, files: list[str], ranks: int = 1) -> list[list[str]]:
    """Which files each rank holds.

    trtllm-checkpoint: rank{N}.safetensors on rank N for N < world size (from config.json's mapping), everything
    else on rank 0; `ranks` is ignored. model-dir: weight shards spread over `ranks` ranks, largest first onto the
    least-filled rank; config, tokenizer and every other file on rank 0.
    """
    if form == "trtllm-checkpoint":
        n = checkpoint_world_size(root)
        plan: list[list[str]] = [[] for _ in range(n)]
        for f in files:
            m = _RANK_FILE.fullmatch(f)
            if m and int(m.group(1)) >= n:
                raise LayoutError(f"{root}: {f} but config.json's mapping has world_size {n}")
            plan[int(m.group(1)) if m else 0].append(f)
        missing = [f"rank{r}.safetensors" for r in range(n) if f"rank{r}.safetensors" not in plan[r]]
        if missing:
            raise LayoutError(f"{root}: world_size {n} but {', '.join(missing)} missing")
        return plan
    if form != "model-dir":
        raise LayoutError(f"unknown form {form!r}")
    if ranks < 1:
        raise LayoutError("a model directory needs at least one rank")
    plan = [[] for _ in range(ranks)]
    fill = [0] * ranks
    shards = sorted((f for f in files if f.endswith(_SHARD_SUFFIXES)), key=lambda f: (-(root / f).stat().st_size, f))
    for f in shards:
        r = min(range(ranks), key=lambda i: (fill[i], i))
        plan[r].append(f)
        fill[r] += (root / f).stat().st_size
    plan[0].extend(f for f in files if f not in set(shards))
    for r, fs in enumerate(plan):
        if not fs:
            raise LayoutError(f"{root}: rank {r} would hold no file ({len(shards)} shards for {ranks} ranks)")
        fs.sort()
    return plan


# ------------------------------------------------------------------------------------------------ target side


@dataclass(frozen=True)
class SourceLayout:
    """What a target needs from a source's record: the form, the memory kind, and every rank's files."""

    model: str
    form: str
    fingerprint: str
    mem_type: str  # "DRAM" or "VRAM": the target allocates the same kind (part of the fingerprint)
    ranks: tuple[tuple[FileSpec, ...], ...]
    replicas: int = 1

    @property
    def total_bytes(self) -> int:
        return sum(s.size for r in self.ranks for s in r)

    @property
    def files(self) -> int:
        return sum(len(r) for r in self.ranks)

    @property
    def device_type(self) -> str:
        return _DEVICE_TYPE[self.mem_type]


def layout_from_record(rec: SourceRecord, model: str) -> SourceLayout | None:
    """The files of `rec` if it is a file-level publication of `model`, else None.

    The record's fingerprint is recomputed from its entries for each form and must match: a record of another
    engine (a vLLM replica announcing the same model name), model or form is not ours. Entries must be whole
    uint8 files with safe, distinct paths. The record itself is only as trustworthy as its reader
    (file_publish.read_source_records): with signed records it is the source's own word.
    """
    ranks = sorted(rec.ranks, key=lambda r: r.rank)
    n = len(ranks)
    if not n or [r.rank for r in ranks] != list(range(n)):
        return None
    mem_types = {r.mem_type for r in ranks}
    if len(mem_types) != 1 or next(iter(mem_types)) not in _DEVICE_TYPE:
        return None
    mem_type = mem_types.pop()
    try:
        specs = [[_spec_of(e.name, e.dtype, e.shape, e.nbytes) for e in r.entries] for r in ranks]
    except LayoutError:
        return None
    for form in FORMS:
        fps = [rank_fingerprint(model, form, r, specs[r], n, _DEVICE_TYPE[mem_type]) for r in range(n)]
        if replica_fingerprint(fps) == rec.fingerprint:
            _check_paths(specs)
            return SourceLayout(model, form, rec.fingerprint, mem_type, tuple(tuple(s) for s in specs))
    return None


def _spec_of(name: str, dtype: str, shape: list[int], nbytes: int) -> FileSpec:
    path, digest = parse_entry_name(name)
    if dtype != "uint8" or shape != [nbytes] or nbytes < 0:
        raise LayoutError(f"entry {name[:80]!r} is not a whole uint8 file")
    return FileSpec(path, nbytes, digest)


def _check_paths(specs: list[list[FileSpec]]) -> None:
    paths = [s.path for r in specs for s in r]
    if len(set(paths)) != len(paths):
        raise LayoutError("the record lists one file path twice")
    dirs = {str(p) for path in paths for p in PurePosixPath(path).parents if str(p) != "."}
    clash = dirs.intersection(paths)
    if clash:
        raise LayoutError(f"the record lists {sorted(clash)[0]!r} both as a file and as a directory")
