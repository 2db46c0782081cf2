"""The seam every engine implements: `EngineAdapter`. The rank hook (runtime_hooks.hook) drives it; an engine
brings one adapter per rank (runtime_hooks.engines: a torch module, vLLM, ...)."""

from __future__ import annotations

from typing import Protocol

import torch

from runtime_hooks.exposure import ModelIdentity

__all__ = ["EngineAdapter", "ModelIdentity"]


class EngineAdapter(Protocol):
    """The one seam an engine implements. Every method runs on the engine's thread."""

    def identity(self) -> ModelIdentity: ...

    def discover_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the engine holds now (parameters, buffers, tensor attributes ...)."""
        ...

    def prepare_target(self) -> None:
        """Target: bring dummy weights into the final layout (the same post-processing a source runs)."""
        ...

    def load_from_storage(self) -> None:
        """Source, or fallback: read real weights from storage and post-process them."""
        ...

    def after_receive(self) -> None:
        """The bytes landed and were verified: refresh host-side copies derived from them."""
        ...

    def derived_state(self) -> dict[str, str]:
        """Numbers derived from the weights outside any tensor (runtime_hooks.derived_state.module_numbers of
        the model): compared between source and target before a release. {} when the engine keeps none."""
        ...

    def reset_for_retry(self) -> None:
        """A receive failed; `load_from_storage` comes next on possibly half-written tensors."""
        ...
