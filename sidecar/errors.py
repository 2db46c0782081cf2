"""Every failure the daemon tells apart, with its verdict: what the replica does next.

Three verdicts exist. *Next source*: this source's bytes are void; try the next candidate, and storage after the
last. *Storage*: no source can help; the engine loads from storage. *Exit without verdict*: READs may still land
or the rank is no longer ours; the engine is told nothing and stays blocked until a new sidecar takes over (fail
closed). The daemon's exit code is looked up here by type (`exit_code`), never by message text.
"""

from __future__ import annotations

from sidecar.contract.codec import ProtocolError


class FatalError(RuntimeError):
    """Exit (code 2): the replica cannot go on (the engine refused a command, ranks disagree). Ranks that were not
    released are told to abort, so a restarted sidecar starts over and a dead one times out into storage."""


class EngineLost(FatalError):
    """The engine this life served is no more (its container restarted or died). The sidecar withdraws, drops the
    old engine's memory and starts the replica's life over for whatever engine comes to the socket (daemon.py);
    only when READs of the old life could not be fenced, or no engine comes within MX_ENGINE_CONNECT_TIMEOUT, does
    the process exit (code 3)."""


class EngineGone(EngineLost):
    """The engine stopped answering pings (three in a row)."""


class EngineRestarted(EngineLost):
    """A rank answered with another engine incarnation than the one this life connected to: a new engine process
    (Kubernetes restarted the engine container) that knows nothing of our session."""


class EngineError(RuntimeError):
    """The hook answered ok=false or not in time; the caller turns it into FatalError (or retries a ping)."""


class CoordinatorUnavailable(RuntimeError):
    """Redis could not be reached. Choosing a role: storage (distinct from 'no source' in metrics and logs);
    publishing: retried until Redis returns."""


class TransferError(RuntimeError):
    """A NIXL transfer failed or could not be set up. Next source."""


class SourceFailed(RuntimeError):
    """The source refused, went silent or ended the session. Next source."""


class SourceBusy(SourceFailed):
    """The source's staging pass is full (MX_FANOUT_READERS): no byte moved; wait for a place or another source."""


class VerifyError(RuntimeError):
    """Received bytes do not match the source's checksums. Next source (this session's bytes are void)."""


class DerivedStateMismatch(VerifyError):
    """Every byte matched, but the engine derived other numbers from them than the source's engine did (a stale
    host-side value, a layout choice outside the fingerprint). Next source, then storage."""


class PlanError(ProtocolError):
    """The source's manifest does not fit this rank (names, sizes, dtypes, chunk bounds). Next source."""


class FenceError(RuntimeError):
    """Exit without verdict (code 4): READs into engine memory may still be in flight, so nothing may touch
    that memory and the engine must not be released or aborted."""


class Superseded(RuntimeError):
    """Exit without verdict (code 2): the rank is no longer ours to write (state moved, another session, or our
    lease went stale)."""


BACKGROUND_TASK_DIED_EXIT = 5

_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (FenceError, 4),
    (EngineLost, 3),
    (Superseded, 2),
    (FatalError, 2),
)


def exit_code(exc: BaseException) -> int:
    """The process exit code for a failure that ended the daemon's life (most specific type first)."""
    for kind, code in _EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return BACKGROUND_TASK_DIED_EXIT


def without_verdict(exc: BaseException) -> bool:
    """True when the engine must be told nothing more (no release, no abort)."""
    return isinstance(exc, FenceError | Superseded)
