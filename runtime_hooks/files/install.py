"""Installing received files into the loader's destination: never a mixed directory, never through a planted link.

Measured before: files of an earlier model that the source did not publish stayed beside the new ones (a stale
`model.safetensors.index.json` makes vLLM read old shards), the files moved one by one with no completion marker,
and the staging folder's fixed name let a pre-created symlink redirect the writes.

Now:
  * the staging folder inside `dest` has a random name and is created exclusively (mkdir fails on anything planted
    there, a symlink included), mode 0700; files in it are created exclusively and fsynced;
  * the destination's marker `.mx-complete` (JSON: model, files with SHA-256) lists what an earlier install wrote.
    Before anything moves, it becomes `.mx-installing` with the old and the new file lists, so an interrupted
    install is recognised and started over;
  * files of the earlier install that the new set lacks are removed; a file that no install of ours wrote is
    refused (the destination must be empty or ours: a loader never deletes what it did not write);
  * files move in with os.replace (atomic each, no symlinked directory followed), then the marker is written last.
A destination without `.mx-complete` is incomplete: whoever reads it must not trust it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path

from runtime_hooks.atomic_file import fsync_dir, replace_file
from runtime_hooks.files.errors import FilesError

__all__ = ["COMPLETE", "INSTALLING", "STAGING_PREFIX", "install", "make_staging", "read_marker"]

STAGING_PREFIX = ".mx-incoming-"
COMPLETE = ".mx-complete"
INSTALLING = ".mx-installing"
_VERSION = 1


def make_staging(dest: Path) -> Path:
    """A fresh staging folder inside `dest` (created exclusively, 0700): nothing planted can be followed."""
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    os.mkdir(staging, 0o700)  # FileExistsError on anything already there, a dangling symlink included
    return staging


def read_marker(dest: Path, name: str = COMPLETE) -> dict[str, str]:
    """path -> SHA-256 of the files an install wrote ({} when there is no readable marker)."""
    try:
        doc = json.loads((dest / name).read_text())
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) and doc.get("v") == _VERSION else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return {}
    return files


def install(staging: Path, dest: Path, model: str, files: dict[str, str]) -> list[str]:
    """Move the verified files of `staging` into `dest` as described above. Returns the stale files removed."""
    root = dest.resolve()
    ours = {**read_marker(dest, INSTALLING), **read_marker(dest, COMPLETE)}  # an interrupted install counts
    foreign = [rel for rel in _files_in(dest) if rel not in files and rel not in ours]
    if foreign:
        raise FilesError(f"{dest} holds {len(foreign)} files that neither the source published nor an earlier "
                         f"receive wrote (e.g. {sorted(foreign)[0]}); receive into an empty directory")
    _write_marker(dest, INSTALLING, model, {**ours, **files})
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest / COMPLETE)
    stale = sorted(rel for rel in ours if rel not in files)
    for rel in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest / rel)
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        parent = target.parent.resolve()
        if parent != root and root not in parent.parents:  # a symlinked directory inside dest
            raise FilesError(f"{target} would land outside {root} (through a symlink); nothing more is written")
        os.replace(staging / rel, target)
    fsync_dir(dest)
    _write_marker(dest, COMPLETE, model, files)
    os.unlink(dest / INSTALLING)
    fsync_dir(dest)
    shutil.rmtree(staging, ignore_errors=True)
    return stale


def _files_in(dest: Path) -> list[str]:
    """Regular files (and links) under dest, relative, leaving out our own hidden entries."""
    out = []
    for p in dest.rglob("*"):
        rel = p.relative_to(dest).as_posix()
        if rel.split("/")[0].startswith(".mx-"):
            continue
        if p.is_symlink() or p.is_file():
            out.append(rel)
    return out


def _write_marker(dest: Path, name: str, model: str, files: dict[str, str]) -> None:
    doc = {"v": _VERSION, "model": model, "files": dict(sorted(files.items()))}
    replace_file(dest / name, json.dumps(doc).encode(), durable=True)
