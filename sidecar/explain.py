"""Why two replicas of one model do not copy from each other: the fields of their fingerprints that differ.

Records carry the fingerprint's description (`SourceRecord.identity`, from runtime_hooks.exposure.describe_fingerprint);
a replica that finds only sources of another fingerprint logs the difference, and `mx-sidecar status --explain`
prints it for every model with more than one fingerprint.
"""

from __future__ import annotations

from sidecar.coordinator import Coordinator
from sidecar.errors import CoordinatorUnavailable
from sidecar.logs import Ctx

_SHOWN = 8  # differing fields named in one line


def identity_differences(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """`field: mine != theirs` for every field that differs, sorted by field ('(none)' where one side lacks it)."""
    return [f"{k}: {mine.get(k, '(none)')} != {theirs.get(k, '(none)')}"
            for k in sorted(mine.keys() | theirs.keys()) if mine.get(k) != theirs.get(k)]


def summary(differences: list[str]) -> str:
    if not differences:
        return "no described field differs (a record without a description, or another protocol)"
    more = f"; and {len(differences) - _SHOWN} more" if len(differences) > _SHOWN else ""
    return "; ".join(differences[:_SHOWN]) + more


async def explain_no_match(coord: Coordinator, fp: str, model: str, identity: dict[str, str], log: Ctx) -> int:
    """Log, for each live source of `model` under another fingerprint, the fields in which it differs from ours.
    Returns how many such sources there were. Best effort: Redis trouble only costs the explanation."""
    try:
        others = [c for c in await coord.sources_of_model(model) if c.record.fingerprint != fp]
    except CoordinatorUnavailable as e:
        log.info("cannot look for sources of other fingerprints (%s)", e)
        return 0
    for c in others:
        log.warning("source %s serves %s under fingerprint %s, not ours (%s): %s", c.record.replica, model,
                    c.record.fingerprint[:12], fp[:12], summary(identity_differences(identity, c.record.identity)),
                    peer=c.record.replica)
    return len(others)
