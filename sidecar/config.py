"""Every MX_* setting, declared once, parsed and validated once.

One registry (SETTINGS) feeds the daemon, the runtime hooks, `mx-sidecar config` and the README
table. A value that makes no sense (a timeout of 0, NaN, a negative size, an unknown mode) is an
error at start-up, never "wait forever" or a silent default.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal
from urllib.parse import urlsplit

from sidecar.contract.messages import MAX_SLOT_BYTES, MAX_SLOTS, MIN_SLOT_BYTES
from sidecar.redis_client import redact_url


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Setting:
    env: str
    field: str
    default: Any
    help: str
    parse: Callable[[str], Any]


def _positive_seconds(raw: str) -> float:
    v = float(raw)
    if not math.isfinite(v) or v <= 0:
        raise ValueError("must be a finite number of seconds > 0 (0 never means 'wait forever')")
    return v


def _positive_int(raw: str) -> int:
    v = int(raw)
    if v <= 0:
        raise ValueError("must be an integer > 0")
    return v


def _non_negative_int(raw: str) -> int:
    v = int(raw)
    if v < 0:
        raise ValueError("must be an integer >= 0")
    return v


def _port(raw: str) -> int:
    v = int(raw)
    if not 0 <= v <= 65535:
        raise ValueError("must be a TCP port 0-65535 (0: pick a free one)")
    return v


def _bytes(raw: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = raw.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(s[-1:], 1)
    v = int(float(s[:-1] if s[-1:] in units else s) * mult)
    if v <= 0:
        raise ValueError("must be a size > 0 (e.g. 268435456, 256MiB, 1GiB)")
    return v


def _slot_bytes(raw: str) -> int:
    v = _bytes(raw)
    if not MIN_SLOT_BYTES <= v <= MAX_SLOT_BYTES:
        raise ValueError(f"must be {MIN_SLOT_BYTES >> 10} KiB to {MAX_SLOT_BYTES >> 30} GiB (smaller slots make a "
                         "transfer millions of round trips; records with smaller slots are refused)")
    return v


def _slot_count(raw: str) -> int:
    v = _positive_int(raw)
    if v > MAX_SLOTS:
        raise ValueError(f"must be at most {MAX_SLOTS}")
    return v


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        v = raw.strip().lower()
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v

    return parse


def _zmq_address(raw: str) -> str:
    if not raw.startswith(("ipc://", "tcp://")):
        raise ValueError("must be an ipc:// or tcp:// ZMQ address")
    if raw.startswith("ipc://@"):
        raise ValueError("an abstract ipc socket (ipc://@...) has no file permissions: use a path")
    return raw


def _flag(raw: str) -> bool:
    v = raw.strip().lower()
    if v not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ValueError("must be 1/0 (or true/false, yes/no, on/off)")
    return v in ("1", "true", "yes", "on")


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return raw


def _text(raw: str) -> str:
    return raw.strip()


def _readable_file(raw: str) -> str:
    path = raw.strip()
    if not os.path.isfile(path):
        raise ValueError("no such file (mount the Secret there, or leave the setting empty)")
    if not os.access(path, os.R_OK):
        raise ValueError("the file is not readable by this user")
    return path


def _devices(raw: str) -> str:
    v = raw.strip().lower()
    if v in ("auto", "cpu", "cuda"):
        return v
    parts = [x.strip() for x in v.split(",")]
    if not all(re.fullmatch(r"cpu|cuda:\d{1,3}", x) for x in parts) or len({x == "cpu" for x in parts}) != 1:
        raise ValueError("must be auto, cpu, cuda, or a list of one kind such as cuda:0,cuda:1")
    return ",".join(parts)


def _plugin(raw: str) -> str:
    v = raw.strip().lower()
    if not re.fullmatch(r"[a-z0-9_]{1,32}", v):
        raise ValueError("must be a trtllm-build --gemm_plugin value such as auto, bfloat16, float16, fp8, disable")
    return v


def _args(raw: str) -> str:
    try:
        shlex.split(raw)
    except ValueError as e:
        raise ValueError(f"must be shell-quoted arguments: {e}") from None
    return raw.strip()


def _nonempty(raw: str) -> str:
    v = raw.strip()
    if not v or len(v) > 200 or any(c in v for c in " \t\n:{}"):
        raise ValueError("must be 1-200 characters without spaces, ':' or braces")
    return v


SETTINGS: tuple[Setting, ...] = (
    Setting("MX_ZMQ_ADDRESS", "zmq_address", "ipc:///tmp/mx/engine.sock",
            "Base ZMQ address of the engine hook; rank r uses `<base>-r.sock` (ipc) or port+r (tcp).",
            _zmq_address),
    Setting("MX_ALLOW_TCP_HOOK", "allow_tcp_hook", False,
            "Allow a tcp:// MX_ZMQ_ADDRESS (anything that reaches the port can drive the engine); default: ipc only, "
            "in a 0700 directory the hook creates.", _flag),
    Setting("MX_MODEL_NAME", "model_name", "",
            "Model label for logs and metrics; default: the model id the engine reports.", _text),
    Setting("MX_REDIS_URL", "redis_url", "redis://127.0.0.1:6379/0",
            "Redis (or Valkey) holding leases, the source registry and heartbeats.", _redis_url),
    Setting("MX_REDIS_USERNAME", "redis_username", "",
            "Redis ACL user (empty: the URL's user, else `default`).", _text),
    Setting("MX_REDIS_PASSWORD_FILE", "redis_password_file", "",
            "File holding the Redis password (a Kubernetes Secret mount); a password in MX_REDIS_URL also works, "
            "not both.", _readable_file),
    Setting("MX_REDIS_TLS_CA_FILE", "redis_tls_ca_file", "",
            "CA bundle that signs the Redis server's certificate (`rediss://` URLs; empty: the system CAs).",
            _readable_file),
    Setting("MX_REDIS_TLS_CERT_FILE", "redis_tls_cert_file", "",
            "Client certificate for Redis servers that ask for one (with MX_REDIS_TLS_KEY_FILE).", _readable_file),
    Setting("MX_REDIS_TLS_KEY_FILE", "redis_tls_key_file", "",
            "Private key of MX_REDIS_TLS_CERT_FILE.", _readable_file),
    Setting("MX_REDIS_PREFIX", "redis_prefix", "mx", "Key prefix, to share one Redis between clusters.", _nonempty),
    Setting("MX_TP_SIZE", "tp_size", 0,
            "Number of engine ranks to connect; 0 = read it from rank 0's manifest.", _non_negative_int),
    Setting("MX_NODE_NAME", "node_name", socket.gethostname(),
            "Node name; targets prefer sources on the same node (set from the Kubernetes downward API).", _nonempty),
    Setting("MX_METRICS_HOST", "metrics_host", "0.0.0.0", "Address the HTTP server binds.", _text),
    Setting("MX_METRICS_PORT", "metrics_port", 9400,
            "Port of /metrics, /healthz, /readyz (0: any free port, logged at start).", _port),
    Setting("MX_SOURCE_MODE", "source_mode", "auto",
            "`direct`: peers read engine memory; `staged`: peers read a sidecar-owned ring; "
            "`auto`: direct for DRAM, staged for CUDA-IPC-imported GPU memory.", _choice("auto", "staged", "direct")),
    Setting("MX_STAGING_SLOTS", "staging_slots", 4, f"Slots in a source's staging ring (1-{MAX_SLOTS}).",
            _slot_count),
    Setting("MX_STAGING_SLOT_BYTES", "staging_slot_bytes", 256 << 20,
            "Bytes per staging slot, also the transfer chunk size (accepts KiB/MiB/GiB; "
            f"{MIN_SLOT_BYTES >> 10} KiB to {MAX_SLOT_BYTES >> 30} GiB).", _slot_bytes),
    Setting("MX_ENGINE_CONNECT_TIMEOUT", "engine_connect_timeout", 600.0,
            "Seconds to wait for every engine rank's socket to answer.", _positive_seconds),
    Setting("MX_REQUEST_TIMEOUT", "request_timeout", 30.0,
            "Seconds for one request to the engine hook (describe, ping, ...).", _positive_seconds),
    Setting("MX_LOAD_TIMEOUT", "load_timeout", 3600.0,
            "Seconds an engine may take to load from storage or prepare a target.", _positive_seconds),
    Setting("MX_SEED_LEASE_TTL", "seed_lease_ttl", 15.0,
            "Seconds a seeding lease lives without renewal (renewed every third of it).", _positive_seconds),
    Setting("MX_SEED_WAIT_TIMEOUT", "seed_wait_timeout", 1800.0,
            "Seconds a replica waits for another replica's seeding before it loads from storage itself.",
            _positive_seconds),
    Setting("MX_HEARTBEAT_INTERVAL", "heartbeat_interval", 2.0, "Seconds between a source's heartbeats.",
            _positive_seconds),
    Setting("MX_SOURCE_TTL", "source_ttl", 10.0,
            "Seconds after the last heartbeat that a source disappears from Redis.", _positive_seconds),
    Setting("MX_POLL_INTERVAL", "poll_interval", 0.25,
            "Seconds between Redis checks while waiting for a seeder.", _positive_seconds),
    Setting("MX_TRANSFER_TIMEOUT", "transfer_timeout", 900.0,
            "Seconds for one rank's whole transfer from one source.", _positive_seconds),
    Setting("MX_STALL_TIMEOUT", "stall_timeout", 30.0,
            "Seconds without progress before a transfer is abandoned (a wedged link reports nothing).",
            _positive_seconds),
    Setting("MX_MAX_SOURCE_ATTEMPTS", "max_source_attempts", 3,
            "Sources a target tries before it loads from storage.", _positive_int),
    Setting("MX_MAX_MESSAGE_BYTES", "max_message_bytes", 64 << 20,
            "Largest message accepted on any socket.", _bytes),
    Setting("MX_MAX_METADATA_BYTES", "max_metadata_bytes", 8 << 20,
            "Largest NIXL agent metadata blob accepted from Redis.", _bytes),
    Setting("MX_SLOW_LINK_GBPS", "slow_link_gbps", 1.0,
            "Warn when a transfer runs below this many GB/s (UCX may have fallen back to TCP).",
            _positive_seconds),
    Setting("MX_SIDECAR_TIMEOUT", "sidecar_timeout", 60.0,
            "Engine hook: seconds without a sidecar before the engine loads from storage by itself.",
            _positive_seconds),
    Setting("MX_MODEL_REVISION", "model_revision", "",
            "Engine hook (vLLM): the revision in the fingerprint; default: --revision, else a digest of the local "
            "checkpoint's config and safetensors headers.", _text),
    # TensorRT-LLM checkpoints and model directories, file level (runtime_hooks/engines/trtllm, runtime_hooks/files).
    Setting("MX_TRTLLM_MODEL_NAME", "trtllm_model_name", "",
            "TRT-LLM / model files: the name a publisher announces and a loader asks for; default: MX_MODEL_NAME.",
            _text),
    Setting("MX_TRTLLM_CHECKPOINT_DIR", "trtllm_checkpoint_dir", "",
            "Publisher: the TRT-LLM checkpoint (or model) directory it serves; loader: where it writes the "
            "received files (default: `<MX_TRTLLM_OUTPUT_DIR>/checkpoint`).", _text),
    Setting("MX_TRTLLM_OUTPUT_DIR", "trtllm_output_dir", "/tmp/mx_trtllm",
            "Loader: root of the received checkpoint (`checkpoint/`), the engine (`engine/`) and the build log.",
            _text),
    Setting("MX_TRTLLM_DEVICES", "trtllm_devices", "auto",
            "Where the file bytes live: `cpu` (shared memory), `cuda` (rank r on GPU r mod count), a list "
            "(`cuda:0,cuda:1`), or `auto` (publisher: GPUs if any; loader: the source's memory kind).", _devices),
    Setting("MX_TRTLLM_SOURCE_TIMEOUT", "trtllm_source_timeout", 3600.0,
            "Loader: seconds to wait for a source of the model before `Source not found`.", _positive_seconds),
    Setting("MX_TRTLLM_BUILD_COMMAND", "trtllm_build_command", "trtllm-build",
            "Loader: the engine builder run on the received checkpoint (looked up on PATH).", _nonempty),
    Setting("MX_TRTLLM_MAX_BATCH_SIZE", "trtllm_max_batch_size", 8, "trtllm-build `--max_batch_size`.",
            _positive_int),
    Setting("MX_TRTLLM_MAX_INPUT_LEN", "trtllm_max_input_len", 2048, "trtllm-build `--max_input_len`.",
            _positive_int),
    Setting("MX_TRTLLM_MAX_SEQ_LEN", "trtllm_max_seq_len", 4096, "trtllm-build `--max_seq_len`.", _positive_int),
    Setting("MX_TRTLLM_MAX_NUM_TOKENS", "trtllm_max_num_tokens", 0,
            "trtllm-build `--max_num_tokens`; 0: not passed (trtllm-build's default).", _non_negative_int),
    Setting("MX_TRTLLM_GEMM_PLUGIN", "trtllm_gemm_plugin", "auto", "trtllm-build `--gemm_plugin`.", _plugin),
    Setting("MX_TRTLLM_BUILD_WORKERS", "trtllm_build_workers", 0,
            "trtllm-build `--workers`; 0: not passed (one worker).", _non_negative_int),
    Setting("MX_TRTLLM_BUILD_ARGS", "trtllm_build_args", "",
            "Extra trtllm-build arguments, shell-quoted, appended last (e.g. `--use_paged_context_fmha enable`).",
            _args),
    Setting("MX_TRTLLM_BUILD_TIMEOUT", "trtllm_build_timeout", 7200.0,
            "Loader: seconds trtllm-build may run before it is stopped and the build counts as failed.",
            _positive_seconds),
    Setting("MX_LOG_LEVEL", "log_level", "info", "debug, info, warning or error.",
            _choice("debug", "info", "warning", "error")),
    Setting("MX_AUTH_KEY_FILE", "auth_key_file", "",
            "File holding the deployment key (>= 32 bytes, a Kubernetes Secret) that authenticates Redis records, "
            "peer messages and engine commands; empty: everything runs UNAUTHENTICATED (logged, in metrics).",
            _text),
    Setting("MX_TEST_FAILPOINTS", "test_failpoints", "",
            "Tests only: `name=action,...` fault injection (sidecar/failpoints.py); never set in production.",
            _text),
)

# Settings that existed once: refusing them beats silently ignoring what an operator asked for.
REMOVED = {
    "MX_VERIFY": ("checksum", "removed: checksums always decide a release (a size check let a wrong chunk through)"),
}


@dataclass(frozen=True)
class Config:
    zmq_address: str
    allow_tcp_hook: bool
    model_name: str
    redis_url: str = field(repr=False)  # may hold a password: shown only through redis_client.redact_url
    redis_username: str
    redis_password_file: str
    redis_tls_ca_file: str
    redis_tls_cert_file: str
    redis_tls_key_file: str
    redis_prefix: str
    tp_size: int
    node_name: str
    metrics_host: str
    metrics_port: int
    source_mode: Literal["auto", "staged", "direct"]
    staging_slots: int
    staging_slot_bytes: int
    engine_connect_timeout: float
    request_timeout: float
    load_timeout: float
    seed_lease_ttl: float
    seed_wait_timeout: float
    heartbeat_interval: float
    source_ttl: float
    poll_interval: float
    transfer_timeout: float
    stall_timeout: float
    max_source_attempts: int
    max_message_bytes: int
    max_metadata_bytes: int
    slow_link_gbps: float
    sidecar_timeout: float
    model_revision: str
    trtllm_model_name: str
    trtllm_checkpoint_dir: str
    trtllm_output_dir: str
    trtllm_devices: str
    trtllm_source_timeout: float
    trtllm_build_command: str
    trtllm_max_batch_size: int
    trtllm_max_input_len: int
    trtllm_max_seq_len: int
    trtllm_max_num_tokens: int
    trtllm_gemm_plugin: str
    trtllm_build_workers: int
    trtllm_build_args: str
    trtllm_build_timeout: float
    log_level: str
    auth_key_file: str
    test_failpoints: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        errors = []
        for s in SETTINGS:
            raw = env.get(s.env)
            if raw is None or raw == "":
                values[s.field] = s.default
                continue
            try:
                values[s.field] = s.parse(raw)
            except ValueError as e:
                shown = redact_url(raw) if s.env == "MX_REDIS_URL" else raw
                errors.append(f"{s.env}={shown!r}: {e}")
        for name, (allowed, why) in REMOVED.items():
            raw = env.get(name)
            if raw and raw.strip().lower() != allowed:
                errors.append(f"{name}={raw!r}: {why}")
        values.update(overrides)
        if errors:
            raise ConfigError("invalid configuration: " + "; ".join(errors))
        cfg = cls(**values)
        cfg._check_relations()
        return cfg

    def _check_relations(self) -> None:
        self._check_redis_auth()
        if self.zmq_address.startswith("tcp://") and not self.allow_tcp_hook:
            raise ConfigError(f"MX_ZMQ_ADDRESS={self.zmq_address}: tcp:// lets any process that reaches the port "
                              "drive the engine; use ipc:// (default) or set MX_ALLOW_TCP_HOOK=1")
        if self.heartbeat_interval * 2 > self.source_ttl:
            raise ConfigError(
                f"MX_SOURCE_TTL ({self.source_ttl}s) must be at least twice MX_HEARTBEAT_INTERVAL "
                f"({self.heartbeat_interval}s), or one late beat drops a live source"
            )

    def _check_redis_auth(self) -> None:
        url = urlsplit(self.redis_url)
        if bool(self.redis_tls_cert_file) != bool(self.redis_tls_key_file):
            raise ConfigError("MX_REDIS_TLS_CERT_FILE and MX_REDIS_TLS_KEY_FILE go together (a client certificate "
                              "needs its key)")
        tls_files = self.redis_tls_ca_file or self.redis_tls_cert_file
        if tls_files and url.scheme != "rediss":
            raise ConfigError("MX_REDIS_TLS_* files are set but MX_REDIS_URL is not rediss:// (TLS is chosen by "
                              "the URL)")
        if self.redis_password_file and url.password:
            raise ConfigError("MX_REDIS_URL holds a password and MX_REDIS_PASSWORD_FILE is set: use one of them")
        if self.redis_username and url.username and url.username != self.redis_username:
            raise ConfigError("MX_REDIS_URL names another user than MX_REDIS_USERNAME")

    def rank_address(self, rank: int) -> str:
        return rank_address(self.zmq_address, rank)


def rank_address(base: str, rank: int) -> str:
    """`ipc:///tmp/mx/vllm.sock` -> `ipc:///tmp/mx/vllm-0.sock`; `tcp://h:5550` -> `tcp://h:5550+rank`."""
    if base.startswith("ipc://"):
        stem, dot, ext = base.rpartition(".")
        if dot and "/" not in ext:
            return f"{stem}-{rank}.{ext}"
        return f"{base}-{rank}"
    host, _, port = base.rpartition(":")
    return f"{host}:{int(port) + rank}"


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = "hostname" if s.env == "MX_NODE_NAME" else (s.default if s.default != "" else "(empty)")
        rows.append(f"| `{s.env}` | `{default}` | {s.help} |")
    return "\n".join(rows)


assert {f.name for f in fields(Config)} == {s.field for s in SETTINGS}, "Config and SETTINGS disagree"
