"""Who can reach the hook socket: a real RankHook binding a real ZMQ socket, checked with real file modes and users."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile

import pytest
import torch
import zmq

from runtime_hooks.engines.torch_module import TorchModuleAdapter
from runtime_hooks.exposure import ModelIdentity
from runtime_hooks.hook import HookError, RankHook
from sidecar.config import Config
from sidecar.contract.codec import PROTOCOL_VERSION, decode, encode
from sidecar.contract.messages import Reply, Request
from sidecar.settings import ConfigError

NOBODY = 65534


def _hook(address: str, env: dict[str, str] | None = None) -> RankHook:
    tensors = {"w": torch.arange(64, dtype=torch.float32)}
    return RankHook(TorchModuleAdapter(tensors, ModelIdentity("toy", "r1", "float32", 0, 1), "/nonexistent"), address,
                    Config.from_env(env or {}))


def _ping(address: str) -> str:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(address)
    try:
        s.send(encode(Request(PROTOCOL_VERSION, 7, "ping")))
        return decode(Reply, s.recv()).state
    finally:
        s.close()


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_hook_creates_its_socket_directory_0700_and_its_socket_0600(tmp_path):
    d = tmp_path / "run" / "mx"  # neither exists yet
    old = os.umask(0o022)  # a usual umask would leave 0755 / 0755 without the guard
    try:
        h = _hook(f"ipc://{d}/engine.sock")
    finally:
        os.umask(old)
    try:
        sock = d / "engine-0.sock"
        assert _mode(str(d)) == 0o700 and _mode(str(sock)) == 0o600
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        assert _ping(f"ipc://{sock}") == "waiting"
    finally:
        h.close()


def _connects_as(uid: int, path: str) -> bool:
    """Whether user `uid` can connect to the unix socket at `path` (a forked child drops to that user)."""
    pid = os.fork()
    if pid == 0:  # the child touches nothing but one socket, then leaves without running any cleanup
        code = 2
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                code = 0
            except PermissionError:
                code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), f"probe failed ({code})"
    return code == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_connect_to_the_hook_socket():
    base = tempfile.mkdtemp(prefix="mx-stranger-")
    try:
        os.chmod(base, 0o755)  # every directory above the hook's own is open to the stranger
        control = socket.socket(socket.AF_UNIX)  # the same socket without the guard: anyone connects
        control.bind(f"{base}/open.sock")
        control.listen()
        os.chmod(f"{base}/open.sock", 0o777)
        assert _connects_as(NOBODY, f"{base}/open.sock"), "the probe must be able to connect where nothing guards"
        control.close()
        h = _hook(f"ipc://{base}/mx/engine.sock")
        try:
            assert not _connects_as(NOBODY, f"{base}/mx/engine-0.sock")
            assert _ping(f"ipc://{base}/mx/engine-0.sock") == "waiting"  # its own user still gets through
        finally:
            h.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_world_writable_socket_directory_is_refused_with_its_path(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)  # as a Kubernetes emptyDir is mounted
    with pytest.raises(HookError, match=rf"{d} is world-writable"):
        _hook(f"ipc://{d}/engine.sock")
    assert not (d / "engine-0.sock").exists()
    os.chmod(d, 0o1777)  # sticky (as /tmp) is no better: anyone can still create the socket's name first
    with pytest.raises(HookError, match="world-writable"):
        _hook(f"ipc://{d}/engine.sock")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another user")
def test_a_socket_directory_owned_by_another_user_is_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(HookError, match=rf"{d} is owned by uid {NOBODY}"):
        _hook(f"ipc://{d}/engine.sock")
    assert not (d / "engine-0.sock").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_is_refused_unless_mx_allow_tcp_hook_is_set(tmp_path):
    port = _free_port()
    with pytest.raises(HookError, match="MX_ALLOW_TCP_HOOK"):
        _hook(f"tcp://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="MX_ALLOW_TCP_HOOK"):
        Config.from_env({"MX_ZMQ_ADDRESS": f"tcp://127.0.0.1:{port}"})
    with pytest.raises(HookError, match="abstract"):
        _hook("ipc://@mx-engine")
    with pytest.raises(ConfigError, match="abstract"):
        Config.from_env({"MX_ZMQ_ADDRESS": "ipc://@mx-engine"})
    h = _hook(f"tcp://127.0.0.1:{port}", {"MX_ALLOW_TCP_HOOK": "1"})
    try:
        assert _ping(f"tcp://127.0.0.1:{port}") == "waiting"
    finally:
        h.close()


def test_a_stale_socket_file_in_the_private_directory_is_replaced(tmp_path):
    d = tmp_path / "mx"
    h = _hook(f"ipc://{d}/engine.sock")
    h.close()
    stale = socket.socket(socket.AF_UNIX)  # a socket file left by a crashed engine
    stale.bind(str(d / "engine-0.sock"))
    stale.close()
    h = _hook(f"ipc://{d}/engine.sock")
    try:
        assert _mode(str(d / "engine-0.sock")) == 0o600 and _ping(f"ipc://{d}/engine-0.sock") == "waiting"
    finally:
        h.close()
