"""The socket side of a rank hook: the rank's ZMQ ROUTER socket and the one thread that serves it.

Requests go to the hook's `handle` on this thread, which answers at once or queues the command for the engine's
thread; replies the engine thread posts are sent from here too (a ZMQ socket is never shared between threads).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import uuid
from collections.abc import Callable

import zmq

from runtime_hooks.socket_guard import bind_hook_socket
from sidecar.config import Config
from sidecar.contract.codec import encode
from sidecar.contract.messages import Reply

__all__ = ["HookServer"]

_RECHECK_MS = 1000

# frames of one request (identity first) -> the reply to send now, or None when the engine thread will post it
Handler = Callable[[bytes, list[bytes]], Reply | None]


class HookServer:
    """Binds `address` (see socket_guard: UnsafeSocketError when it is not safe) and serves it once started."""

    def __init__(self, address: str, cfg: Config, handle: Handler, name: str) -> None:
        self.address = address
        self._handle = handle
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        # Unique per hook: id(self) was reused by a hook whose construction failed, whose inproc name stayed bound.
        self._wake_addr = f"inproc://mx-hook-wake-{uuid.uuid4().hex}"
        self._replies: queue.Queue[tuple[bytes, Reply]] = queue.Queue()
        self._wake_recv = self._ctx.socket(zmq.PULL)
        self._wake_recv.bind(self._wake_addr)
        self._wake_send = self._ctx.socket(zmq.PUSH)
        self._wake_send.connect(self._wake_addr)
        self._wake_lock = threading.Lock()
        try:
            self._sock = self._bind(cfg)
        except BaseException:
            self._wake_send.close(0)
            self._wake_recv.close(0)
            raise
        self._closed = False
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def post(self, ident: bytes, reply: Reply) -> None:
        """From any thread: send `reply` to `ident` (dropped once closed)."""
        self._replies.put((ident, reply))
        with self._wake_lock:
            if not self._closed:
                self._wake()

    def _wake(self) -> None:
        # Never blocks (the caller holds _wake_lock, which stop() needs): a full pipe already holds a wake-up.
        with contextlib.suppress(zmq.Again):
            self._wake_send.send(b"", zmq.NOBLOCK)

    def _bind(self, cfg: Config) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        try:  # ipc only (unless allowed), in a private directory, socket 0600: see socket_guard
            bind_hook_socket(sock, self.address, cfg.allow_tcp_hook)
        except BaseException:
            sock.close(0)
            raise
        return sock

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        while not self._closed:
            # The timeout only backs up the wake-up message: a loader whose hook thread outlived close() once
            # hung on its way out in CI (not reproduced); the thread now ends within a second of stop() regardless.
            events = dict(poller.poll(_RECHECK_MS))
            if self._wake_recv in events:
                while self._wake_recv.poll(0):
                    self._wake_recv.recv()
                while not self._replies.empty():
                    ident, reply = self._replies.get_nowait()
                    self._sock.send_multipart([ident, encode(reply)])
            if self._sock in events:
                frames = self._sock.recv_multipart()
                now = self._handle(frames[0], frames)
                if now is not None:
                    self._sock.send_multipart([frames[0], encode(now)])
        self._sock.close(0)
        self._wake_recv.close(0)

    def stop(self) -> bool:
        """Ask the thread to end; False when it was asked before."""
        with self._wake_lock:
            if self._closed:
                return False
            self._closed = True
            self._wake()
            self._wake_send.close(100)  # a moment for the wake-up to pass (linger 0 may drop it)
        return True

    def join(self) -> None:
        """Wait for the thread (5 s at most), then remove the ipc socket file."""
        self.thread.join(timeout=5)
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address.removeprefix("ipc://"))
            except FileNotFoundError:
                pass
