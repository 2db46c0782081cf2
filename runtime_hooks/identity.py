"""What any engine needs to name what it loaded, beside its own settings: the checkpoint's revision (given, or
computed from a local directory's config and weight file headers) and short digests of configuration text.

An engine's adapter puts these into its `ModelIdentity` (runtime_hooks.exposure); two replicas whose identities
differ never copy weights from each other.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

__all__ = ["checkpoint_revision", "config_text", "digest", "json_digest", "local_checkpoint_digest"]

# Files whose bytes name a checkpoint directory (hashed whole); weight files contribute their headers only.
_CONFIG_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not read (a corrupt or foreign file)


def checkpoint_revision(model: str, revision: str | None) -> str:
    """MX_MODEL_REVISION, else the engine's own revision setting, else (local directory) a digest of its config
    and weight file headers (names, dtypes, shapes, sizes; no weight bytes are read), else "main"."""
    from sidecar.config import Config

    env = Config.from_env().model_revision
    if env:
        return env
    if revision:
        return str(revision)
    path = Path(model)
    if path.is_dir():
        return "local-" + local_checkpoint_digest(path)
    return "main"


def local_checkpoint_digest(path: Path) -> str:
    h = hashlib.sha256()
    for name in _CONFIG_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with f.open("rb") as fh:
            head = fh.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= _MAX_HEADER:
                    h.update(fh.read(n))
    for f in sorted(path.glob("*.bin")) + sorted(path.glob("*.pt")):
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
    return h.hexdigest()[:16]


def config_text(cfg: object) -> str:
    """A Hugging Face config's full JSON (defaults included, so a changed default changes it), else its repr."""
    try:
        return str(cfg.to_json_string(use_diff=False))  # type: ignore[attr-defined]
    except Exception:
        return repr(cfg)


def json_digest(value: object) -> str:
    """`digest` of `value` as canonical JSON (sorted keys; what JSON cannot hold, as str)."""
    return digest(json.dumps(value, sort_keys=True, default=str))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
