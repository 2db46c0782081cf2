"""Adapter for any torch module or dict of tensors, loading from a safetensors directory.

Storage layout: `rank{r}.safetensors` per rank if present, else every `*.safetensors` file holds the
full (unsharded) tensors and each rank takes its slice along the one dimension where its local shape
differs by a factor of tp_size (Megatron-style column/row sharding).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from runtime_hooks.derived_state import module_numbers
from runtime_hooks.exposure import ModelIdentity


class TorchModuleAdapter:
    def __init__(
        self,
        tensors: torch.nn.Module | Mapping[str, torch.Tensor],
        identity: ModelIdentity,
        checkpoint_dir: str | os.PathLike[str],
    ) -> None:
        self._source = tensors
        self._identity = identity
        self._dir = Path(checkpoint_dir)

    def identity(self) -> ModelIdentity:
        return self._identity

    def discover_tensors(self) -> dict[str, torch.Tensor]:
        if isinstance(self._source, torch.nn.Module):
            found: dict[str, torch.Tensor] = {}
            for name, p in self._source.named_parameters(remove_duplicate=False):
                found[name] = p
            for name, b in self._source.named_buffers(remove_duplicate=False):
                found[name] = b
            return found
        return dict(self._source)

    def prepare_target(self) -> None:
        """The generic module has no post-processing: its tensors are final as built."""

    def after_receive(self) -> None:
        """No host-side copies to refresh."""

    def derived_state(self) -> dict[str, str]:
        return module_numbers(self._source) if isinstance(self._source, torch.nn.Module) else {}

    def reset_for_retry(self) -> None:
        """load_from_storage overwrites every tensor; nothing to undo."""

    @torch.no_grad()
    def load_from_storage(self) -> None:
        r, n = self._identity.tp_rank, self._identity.tp_size
        tensors = self.discover_tensors()
        rank_file = self._dir / f"rank{r}.safetensors"
        files = [rank_file] if rank_file.exists() else sorted(self._dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors files in {self._dir}")
        missing = set(tensors)
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if key not in tensors:
                        continue
                    dst = tensors[key]
                    src = sf.get_tensor(key) if rank_file.exists() else _rank_slice(sf, key, dst.shape, r, n)
                    if src.shape != dst.shape or src.dtype != dst.dtype:
                        raise ValueError(f"{key}: checkpoint {src.dtype}{list(src.shape)} != engine "
                                         f"{dst.dtype}{list(dst.shape)}")
                    dst.copy_(src)
                    missing.discard(key)
        if missing:
            raise KeyError(f"checkpoint {self._dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def _rank_slice(sf: object, key: str, local: torch.Size, rank: int, n: int) -> torch.Tensor:
    sl = sf.get_slice(key)  # type: ignore[attr-defined]
    full = list(sl.get_shape())
    if full == list(local):
        return sf.get_tensor(key)  # type: ignore[attr-defined,no-any-return]
    dims = [d for d, (a, b) in enumerate(zip(full, local, strict=False)) if a != b]
    if len(full) != len(local) or len(dims) != 1 or full[dims[0]] != local[dims[0]] * n:
        raise ValueError(f"{key}: cannot shard checkpoint shape {full} into local shape {list(local)} over {n} ranks")
    d, size = dims[0], local[dims[0]]
    index = tuple(slice(rank * size, (rank + 1) * size) if i == d else slice(None) for i in range(len(full)))
    return sl[index]  # type: ignore[no-any-return]
