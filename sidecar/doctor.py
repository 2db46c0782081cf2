"""`mx-sidecar doctor [--json] [--model-bytes N]`: what this container needs before the first replica, one check at
a time, each with a fix. Runs in the sidecar's container (an init container, or `kubectl exec`) with the same
MX_* settings as the daemon; it changes nothing except a few short-lived keys under MX_REDIS_PREFIX.

Exit 1 when a check fails, else 0 (warnings included)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from sidecar.config import Config
from sidecar.settings import ConfigError, redact_url

Status = Literal["ok", "warn", "fail"]
REDIS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}  {self.detail}" + (f"  (fix: {self.fix})" if self.fix else "")


# ------------------------------------------------------------------------------------------------ Redis

# The commands the sidecar and `mx-sidecar status` issue (deploy/make-secrets.sh's ACL grants exactly these).
REDIS_COMMANDS = ("ping", "get", "getrange", "set", "del", "sadd", "srem", "smembers", "srandmember", "pexpire",
                  "pttl", "incrby", "eval", "multi", "exec", "scan")


async def _probe_commands(r: Any, prefix: str) -> list[str]:
    """Runs every command the sidecar uses on throw-away keys; returns the ones the ACL refuses."""
    from redis.exceptions import NoPermissionError

    base = f"{prefix}:doctor:{uuid.uuid4().hex[:12]}"
    key, num, members = f"{base}:v", f"{base}:n", f"{base}:s"
    steps: list[tuple[tuple[str, ...], Callable[[], Any]]] = [
        (("set",), lambda: r.set(key, b"x", px=60_000)),
        (("get",), lambda: r.get(key)),
        (("getrange",), lambda: r.getrange(key, 0, 0)),
        (("pexpire",), lambda: r.pexpire(key, 60_000)),
        (("pttl",), lambda: r.pttl(key)),
        (("incrby",), lambda: r.incrby(num, 1)),
        (("sadd",), lambda: r.sadd(members, "a")),
        (("smembers",), lambda: r.smembers(members)),
        (("srandmember",), lambda: r.srandmember(members)),
        (("srem",), lambda: r.srem(members, "a")),
        (("eval",), lambda: r.eval("return 1", 1, key)),
        (("multi", "exec"), lambda: r.pipeline(transaction=True).get(key).execute()),
        (("scan",), lambda: r.scan(0, match=f"{base}:*", count=10)),
        (("del",), lambda: r.delete(key, num, members)),
    ]
    denied: list[str] = []
    for names, step in steps:
        try:
            await step()
        except NoPermissionError:
            denied += names
    if "del" in denied:  # leave nothing behind for longer than the TTL
        for k in (num, members):
            try:
                await r.pexpire(k, 60_000)
            except NoPermissionError:
                pass
    return denied


def _redis_failure(where: str, e: BaseException) -> Check:
    """The first command failed: which setting to fix, by describe_error's reading of the error."""
    from sidecar.redis_client import describe_error

    desc = describe_error(e) or type(e).__name__
    if desc.startswith("authentication failed"):
        fix = ("the password in MX_REDIS_PASSWORD_FILE (Secret mx-redis-auth, key password) and MX_REDIS_USERNAME "
               "must match the server's ACL user; rotate both together (Redis first)")
    elif desc.startswith("the Redis user lacks a permission"):
        fix = "grant the commands of deploy/make-secrets.sh to the ACL user"
    elif desc.startswith("TLS failed"):
        fix = "MX_REDIS_TLS_CA_FILE must hold the CA of the server's certificate (Secret mx-redis-tls, ca.crt)"
    else:
        return Check("redis", "fail", f"{where} unreachable: {desc}",
                     "check MX_REDIS_URL, the Redis Service/pod and the NetworkPolicy (egress to it)")
    return Check("redis", "fail", f"{where}: {desc}", fix)


async def _redis(cfg: Config) -> Check:
    from redis.exceptions import RedisError

    from sidecar.redis_client import connect, describe_error

    where = redact_url(cfg.redis_url)
    r = connect(cfg)
    try:
        try:
            await asyncio.wait_for(r.ping(), REDIS_TIMEOUT_S)
        except (TimeoutError, RedisError, OSError) as e:
            return _redis_failure(where, e)
        try:
            denied = await asyncio.wait_for(_probe_commands(r, cfg.redis_prefix), REDIS_TIMEOUT_S)
        except (TimeoutError, RedisError, OSError) as e:
            return Check("redis", "fail", f"{where}: {describe_error(e) or type(e).__name__}",
                         "check the Redis server's health and the ACL of MX_REDIS_USERNAME")
        if denied:
            return Check("redis", "fail",
                         f"{where}: the ACL refuses {' '.join(denied)} on keys {cfg.redis_prefix}:*",
                         f"grant +{' +'.join(denied)} and ~{cfg.redis_prefix}:* to the Redis user "
                         "(deploy/make-secrets.sh's ACL has them)")
        user = cfg.redis_username or "default"
        return Check("redis", "ok", f"{where}: reachable, authenticated as {user}, the ACL allows every command "
                                    f"the sidecar uses on {cfg.redis_prefix}:*")
    finally:
        await r.aclose()


def check_redis(cfg: Config) -> Check:
    try:
        import redis  # noqa: F401  the sidecar extra
    except ImportError:
        return Check("redis", "fail", "redis-py is not installed", "install the sidecar extra: mx-sidecar[sidecar]")
    try:
        return asyncio.run(_redis(cfg))
    except ConfigError as e:  # an unreadable password file, a bad URL
        return Check("redis", "fail", str(e), "mount the mx-redis-auth Secret where MX_REDIS_PASSWORD_FILE points")


# ------------------------------------------------------------------------------------------------ files

def check_key_file(cfg: Config) -> Check:
    from sidecar.contract.auth import Keyring

    path = cfg.auth_key_file
    if not path:
        return Check("auth-key", "warn", "MX_AUTH_KEY_FILE is not set: records and messages are not signed",
                     "mount the mx-auth-key Secret (defaultMode: 288) and set MX_AUTH_KEY_FILE")
    try:
        keys = Keyring.from_file(path)  # the daemon's own rule: refuses a key others may read
    except FileNotFoundError:
        return Check("auth-key", "fail", f"{path} does not exist",
                     "mount the mx-auth-key Secret there, or fix MX_AUTH_KEY_FILE")
    except ValueError as e:
        return Check("auth-key", "fail", str(e), f"chmod 600 {path}, or defaultMode: 288 on its Secret volume")
    except OSError as e:
        return Check("auth-key", "fail", f"{path}: {type(e).__name__}: {e.strerror}",
                     "the pod's fsGroup must own the Secret volume (deploy/base sets fsGroup and defaultMode: 288)")
    if not keys.enabled:
        return Check("auth-key", "fail", f"{path} is empty", "recreate the mx-auth-key Secret (deploy/make-secrets.sh)")
    mode = os.stat(path).st_mode & 0o777
    return Check("auth-key", "ok", f"{path}: mode {mode:04o}, readable only by its owner and group")


def check_socket_dir(cfg: Config) -> Check:
    from runtime_hooks.socket_guard import UnsafeSocketError, check_address, private_dir

    address = cfg.zmq_address
    try:
        check_address(address, cfg.allow_tcp_hook)
    except UnsafeSocketError as e:
        return Check("socket-dir", "fail", str(e), "use MX_ZMQ_ADDRESS=ipc:///tmp/mx/hook/engine.sock")
    if address.startswith("tcp://"):
        return Check("socket-dir", "warn", f"{address}: a tcp hook (MX_ALLOW_TCP_HOOK=1): anything that reaches the "
                                           "port can drive the engine", "use an ipc:// address")
    directory = os.path.dirname(address.removeprefix("ipc://")) or "."
    if not os.path.lexists(directory):
        parent = os.path.dirname(directory) or "."
        if os.path.isdir(parent):
            return Check("socket-dir", "warn", f"{directory} does not exist yet: the hook creates it 0700 in {parent}",
                         "")
        return Check("socket-dir", "fail", f"{directory} does not exist, nor does {parent}: the engine and the "
                                           "sidecar do not share a socket volume",
                     f"mount one emptyDir (mx-sockets) at {parent} in both containers, or fix MX_ZMQ_ADDRESS")
    try:
        private_dir(directory)  # exists: only checks (owner = this user, not world-writable, a directory)
    except UnsafeSocketError as e:
        return Check("socket-dir", "fail", str(e), f"chmod 700 {directory}, or point MX_ZMQ_ADDRESS into a private "
                                                   "subdirectory (the hook creates it 0700)")
    mode = os.stat(directory).st_mode & 0o777
    return Check("socket-dir", "ok", f"{directory}: mode {mode:04o}, owned by this user (uid {os.geteuid()})")


def check_shm(model_bytes: int | None, path: str = "/dev/shm") -> Check:
    try:
        st = os.statvfs(path)
    except OSError as e:
        return Check("shm", "warn", f"{path}: {e.strerror}", "mount a memory emptyDir at /dev/shm")
    size = st.f_blocks * st.f_frsize
    detail = f"{path}: {size / 2**30:.1f} GiB"
    if model_bytes and size < model_bytes:
        return Check("shm", "warn", f"{detail}, smaller than the model ({model_bytes / 2**30:.1f} GiB)",
                     "raise the dshm emptyDir's sizeLimit (CPU engines keep their tensors there)")
    return Check("shm", "ok", detail + (f", room for the model ({model_bytes / 2**30:.1f} GiB)" if model_bytes else ""))


# ------------------------------------------------------------------------------------------------ transports

def check_ucx() -> Check:
    exe = shutil.which("ucx_info")
    if exe is None:
        nixl = next((m for m in ("nixl_cu13", "nixl_cu12", "nixl") if importlib.util.find_spec(m)), None)
        if nixl is not None:  # as sidecar/transport.py picks it; importing it would load UCX: not cheap
            return Check("ucx", "warn", f"ucx_info not found; {nixl} is installed (its bundled UCX picks transports "
                                        "at run time)", "run one sidecar with UCX_PROTO_INFO=y to see them")
        return Check("ucx", "warn", "not found (no ucx_info, no nixl)",
                     "install the NIXL extra: mx-sidecar[nixl-cu13] (or nixl-cu12)")
    try:
        out = subprocess.run([exe, "-d"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("ucx", "warn", f"ucx_info -d: {type(e).__name__}", "")
    transports = sorted({ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Transport:" in ln})
    if not transports:
        return Check("ucx", "warn", "ucx_info -d lists no transport", "check the UCX installation")
    fast = [t for t in transports if t in ("rc_mlx5", "rc_verbs", "dc_mlx5", "cuda_ipc")]
    return Check("ucx", "ok" if fast else "warn", "transports: " + " ".join(transports),
                 "" if fast else "only TCP/shared memory: no RDMA or CUDA IPC (components/rdma, GPU access)")


def check_rdma(root: str = "/sys/class/infiniband") -> Check:
    p = Path(root)
    devices = sorted(d.name for d in p.iterdir()) if p.is_dir() else []
    if not devices:
        return Check("rdma", "warn", "no RDMA device: between nodes NIXL uses TCP",
                     "for GPUDirect RDMA add components/rdma (an RDMA device plugin and network)")
    return Check("rdma", "ok", "devices: " + " ".join(devices))


# The exporting process: one CUDA allocation filled with 7.0, its IPC handle and offset as hex on stdout (no
# pickle across the process boundary: torch.multiprocessing's queue would pickle), then it waits for stdin to close.
_IPC_EXPORTER = """
import sys, torch
from sidecar.memory.cuda import driver
t = torch.full((1024,), 7.0, device="cuda:0")
torch.cuda.synchronize()
base, _ = driver().address_range(t.data_ptr())
print(driver().ipc_get(base).hex(), t.data_ptr() - base, flush=True)
sys.stdin.read()
"""


def check_gpu() -> Check:
    if importlib.util.find_spec("torch") is None:
        return Check("gpu", "ok", "torch is not installed: no GPU check (CPU engines need none)")
    import torch

    if not torch.cuda.is_available():
        return Check("gpu", "ok", "no GPU visible (CPU engine, or see README: GPUs for the sidecar)")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    fix = "shareProcessNamespace: true in the pod, and the engine's GPUs visible to the sidecar (README)"
    child = subprocess.Popen([sys.executable, "-c", _IPC_EXPORTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        handle_hex, offset = child.stdout.readline().split()
        from sidecar.memory.cuda import driver

        d = driver()
        with d.on(0):
            ptr = d.ipc_open(bytes.fromhex(handle_hex))
            try:
                got = d.read(ptr + int(offset), 4096)
            finally:
                d.ipc_close(ptr)
    except Exception as e:  # any failure of the round trip is the finding, with the exporter's own error if any
        child.kill()
        err = (child.communicate(timeout=30)[1] or "").strip().splitlines()[-1:]
        return Check("gpu", "fail", f"{len(names)} GPU(s) ({names[0]}); CUDA IPC between processes failed: "
                                    f"{type(e).__name__}: {e} {' '.join(err)}", fix)
    finally:
        if child.poll() is None:
            child.communicate("", timeout=30)
    if got != torch.full((1024,), 7.0).numpy().tobytes():
        return Check("gpu", "fail", "CUDA IPC between processes returned other bytes than were written", fix)
    return Check("gpu", "ok", f"{len(names)} GPU(s): {', '.join(sorted(set(names)))}; CUDA IPC between processes works")


# ------------------------------------------------------------------------------------------------ CLI

def run_checks(cfg: Config, model_bytes: int | None = None) -> list[Check]:
    return [check_redis(cfg), check_key_file(cfg), check_socket_dir(cfg), check_shm(model_bytes), check_ucx(),
            check_rdma(), check_gpu()]


def main(cfg: Config, as_json: bool, model_bytes: int | None) -> int:
    checks = run_checks(cfg, model_bytes)
    for c in checks:
        print(json.dumps(asdict(c)) if as_json else c.line())
    sys.stdout.flush()
    return 1 if any(c.status == "fail" for c in checks) else 0
