"""One RankHook per rank of a file-level publisher or receiver, each blocked on its own engine thread until the
sidecar's verdict (publisher and receiver alike)."""

from __future__ import annotations

import threading
import time

import torch

from runtime_hooks.files.errors import SidecarVanished
from runtime_hooks.hook import Outcome, RankHook

__all__ = ["close_hooks", "run_hooks"]


def close_hooks(hooks: list[RankHook]) -> None:
    """Close every rank's hook, then give the file buffers' GPU memory back (publisher and receiver alike)."""
    for h in hooks:
        h.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_hooks(hooks: list[RankHook], devices: list[str], sidecar_timeout: float | None,
              orphan_grace: float | None = None) -> list[Outcome]:
    """Block every rank until its verdict, one engine thread per rank (adapter calls run on it).

    With `orphan_grace`, a rank whose writing session stayed silent (RankHook.orphaned) for that long after the
    hook's own timeout ends the wait with SidecarVanished (an engine would stay blocked for a new sidecar; a files
    target has nothing to protect but buffers the caller must then never reuse)."""
    outcomes: list[Outcome | None] = [None] * len(hooks)
    errors: list[BaseException | None] = [None] * len(hooks)

    def run(rank: int) -> None:
        try:
            if devices[rank].startswith("cuda"):
                torch.cuda.set_device(devices[rank])
            outcomes[rank] = hooks[rank].run_until_ready(sidecar_timeout)
        except BaseException as e:
            errors[rank] = e

    threads = [threading.Thread(target=run, args=(r,), name=f"mx-files-rank{r}") for r in range(len(hooks))]
    for t in threads:
        t.start()
    orphaned_since: float | None = None
    while alive := [t for t in threads if t.is_alive()]:
        alive[0].join(0.5)  # (indexing a second is_alive() scan raced a thread that ended between the two)
        if orphan_grace is None:
            continue
        if not any(h.orphaned() for h in hooks):
            orphaned_since = None
        elif orphaned_since is None:
            orphaned_since = time.monotonic()
        elif time.monotonic() - orphaned_since >= orphan_grace:
            for h in hooks:
                h.close()  # run_until_ready raises "hook closed" in every waiting rank
            for t in threads:
                t.join()
            raise SidecarVanished("the sidecar beside this loader went silent mid-transfer and no new sidecar took "
                                  "over; nothing was written")
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]
    return [o for o in outcomes if o is not None]
