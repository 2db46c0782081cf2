"""Staying true to the engine: what each rank looked like when published, and whether it still does.

A source re-checks its engine at every keepalive ping (state, layout digest, memory handles, the weights
version the engine bumps on an in-place update). Any change withdraws the source at once (the Publisher
acts on what this module finds); it publishes again only after a fresh import and fresh checksums, and
never after an in-place weight update (those bytes are no longer the checkpoint's that the fingerprint names).
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.contract.messages import Reply


@dataclass(frozen=True)
class _View:
    """What a rank looked like when its checksums were taken."""

    layout_digest: str
    handles: tuple[object, ...]
    weights_version: int


class EngineWatch:
    def __init__(self) -> None:
        self._views: dict[int, _View] = {}

    def take(self, replies: list[Reply]) -> None:
        """Remember the engine as it is now (at publication)."""
        self._views = {r.manifest.tp_rank: _View(r.manifest.layout_digest, tuple(r.manifest.handles),
                                                 r.weights_version)
                       for r in replies if r.manifest is not None}

    def watches(self, rank: int) -> bool:
        return rank in self._views

    def change(self, rank: int, reply: Reply) -> str:
        """Why this ping reply is no longer what was published ('state', 'weights_updated', 'layout'), or ''."""
        view = self._views.get(rank)
        if view is None:
            return ""
        if reply.state != "ready":
            return "state"
        if reply.weights_version != view.weights_version:
            return "weights_updated"
        if reply.manifest is None or reply.manifest.layout_digest != view.layout_digest \
                or tuple(reply.manifest.handles) != view.handles:
            return "layout"
        return ""

    def ready_again(self, replies: list[Reply]) -> bool:
        """All ranks ready, with the weights version published (a rebuild, not an in-place update)."""
        return all(r.state == "ready" for r in replies) and \
            all(r.weights_version == self._views[r.manifest.tp_rank].weights_version
                for r in replies if r.manifest is not None)
