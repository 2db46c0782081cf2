"""The failures of file-level publication and receive; each message says what to do."""

from __future__ import annotations

__all__ = ["FilesError", "SidecarVanished", "SourceNotFound", "TransferFailed"]


class FilesError(RuntimeError):
    """A file-level publication or receive that cannot go on; the message says what to do."""


class SourceNotFound(FilesError, TimeoutError):
    """No live source of the model (within the timeout, or it vanished before the sidecar could use it)."""


class TransferFailed(FilesError):
    """The bytes did not arrive verified; nothing was written to the destination."""


class SidecarVanished(FilesError):
    """The sidecar session that was writing a rank went silent and no new sidecar took the rank over."""
