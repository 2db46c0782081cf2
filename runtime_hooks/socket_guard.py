"""Who may reach the hook socket: only this user, through a private directory.

A client of the hook socket can read the engine's memory handles and release a waiting engine, so the
socket lives in a directory only its owner can enter: `ipc://` by default, the directory created 0700 and
refused when others can write it or another user owns it, the socket itself 0600. `tcp://` (reachable by
anything on the network namespace) and Linux abstract sockets (`ipc://@name`: no file permissions at all)
are refused unless explicitly allowed (MX_ALLOW_TCP_HOOK=1, tcp only).
"""

from __future__ import annotations

import os
import stat

import zmq


class UnsafeSocketError(RuntimeError):
    """The hook's address or its directory would let someone other than this user reach the socket."""


def check_address(address: str, allow_tcp: bool) -> None:
    """Refuses `tcp://` unless allowed, abstract `ipc://@...` always, and anything but ipc/tcp."""
    if address.startswith("tcp://"):
        if not allow_tcp:
            raise UnsafeSocketError(f"hook address {address}: tcp:// lets any process that reaches the port drive "
                                    "the engine; use ipc:// or set MX_ALLOW_TCP_HOOK=1")
        return
    if not address.startswith("ipc://"):
        raise UnsafeSocketError(f"hook address {address}: must be ipc:// (or tcp:// with MX_ALLOW_TCP_HOOK=1)")
    if address.removeprefix("ipc://").startswith("@"):
        raise UnsafeSocketError(f"hook address {address}: an abstract socket has no file permissions; use a path")


def private_dir(path: str) -> None:
    """Creates `path` 0700 if missing; refuses it when world-writable or owned by another user (or no directory)."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask: set it exactly
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return private_dir(path)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketError(f"hook socket directory {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeSocketError(f"hook socket directory {path} is owned by uid {st.st_uid}, not by this user "
                                f"(uid {os.geteuid()}): another user could replace or reach the socket")
    if st.st_mode & stat.S_IWOTH:
        raise UnsafeSocketError(f"hook socket directory {path} is world-writable (mode {stat.S_IMODE(st.st_mode):o}): "
                                "point MX_ZMQ_ADDRESS into a private subdirectory, which the hook creates 0700")


def bind_hook_socket(sock: zmq.Socket, address: str, allow_tcp: bool) -> None:
    """Binds `sock` to `address` under the rules above; an ipc socket file ends up 0600 in a private directory."""
    check_address(address, allow_tcp)
    if address.startswith("tcp://"):
        sock.bind(address)
        return
    path = address.removeprefix("ipc://")
    private_dir(os.path.dirname(os.path.abspath(path)))
    if os.path.lexists(path):
        os.unlink(path)  # a stale socket from a crashed engine would refuse the bind
    sock.bind(address)
    os.chmod(path, 0o600)  # no one else can enter the directory meanwhile
