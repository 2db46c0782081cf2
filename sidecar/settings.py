"""Every MX_* setting, declared once: field, type, variable, parser and help in one line of `Settings`.

A leaf module (standard library only): the daemon, the runtime hooks, `mx-sidecar config`, the README table
(`mx-sidecar config --markdown`) and the bounds the wire contract checks all come from here. A value that makes
no sense (a timeout of 0, NaN, a negative size, an unknown mode) is an error at start-up, never "wait forever" or a
silent default. sidecar/config.py adds the checks between settings.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

# Bounds on staging rings, shared with the wire contract (sidecar/contract/messages.py imports them from here).
MAX_SLOTS = 256
MIN_SLOT_BYTES = 64 << 10
MAX_SLOT_BYTES = 16 << 30

# Environment UCX reads when a NIXL agent starts (sidecar/transport.py sets them there; an operator's value wins).
# UCX_MEMTYPE_CACHE: UCX caches memory types per address range; an agent created before CUDA IPC handles were
# imported then classified the imported VRAM as host memory and registration failed with NIXL_ERR_BACKEND
# (measured on H100, five orderings, twice). Without the cache the order does not matter.
UCX_ENV_DEFAULTS = {"UCX_MEMTYPE_CACHE": "n"}

SourceMode = Literal["auto", "staged", "direct"]
_SECRET_QUERY = re.compile(r"pass|secret|token|key", re.IGNORECASE)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Setting:
    env: str
    field: str
    default: Any
    help: str
    parse: Callable[[str], Any]


def setting(env: str, default: Any, parse: Callable[[str], Any], help: str, *, repr: bool = True) -> Any:
    """One field of `Settings`: its variable, default, parser and help (the README's row)."""
    return dataclasses.field(default=default, repr=repr, metadata={"env": env, "parse": parse, "help": help})


def redact_url(url: str) -> str:
    """`redis://u:secret@h:6379/0?password=x` -> `redis://u:***@h:6379/0?password=***`. Never raises."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if colon else f"{userinfo}@{hostport}"
        query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    except Exception:  # a URL too broken to parse is shown as its scheme only
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"


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


def _fanout(raw: str) -> int:
    v = _positive_int(raw)
    if v > 64:
        raise ValueError("must be 1-64 (a source holds at most 64 reader sessions)")
    return v


def _topology(raw: str) -> str:
    v = raw.strip().strip("/")
    parts = v.split("/")
    if len(v) > 200 or any(not p or not p.replace("-", "").replace("_", "").replace(".", "").isalnum()
                           for p in parts):
        raise ValueError("must be `/`-separated labels of letters, digits, '-', '_' or '.' (at most 200 "
                         "characters), outermost first, e.g. zone-a/rack-7/nvl-2")
    return v


def _abs_dir(raw: str) -> str:
    v = raw.strip()
    if v and not os.path.isabs(v):
        raise ValueError("must be an absolute directory path (the same in the engine and the sidecar container)")
    return v.rstrip("/") or v


def _ready_url(raw: str) -> str:
    v = raw.strip()
    if v and urlsplit(v).scheme not in ("http", "https", "file"):
        raise ValueError("must be an http(s):// URL that answers 200 once the engine serves (vLLM: "
                         "http://127.0.0.1:8000/health) or a file:// path that exists then")
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


# Settings that existed once: refusing them beats silently ignoring what an operator asked for.
REMOVED = {
    "MX_VERIFY": ("checksum", "removed: checksums always decide a release (a size check let a wrong chunk through)"),
}


@dataclass(frozen=True)
class Settings:
    """The declarations. Config (sidecar/config.py) is this plus the checks between fields."""

    zmq_address: str = setting("MX_ZMQ_ADDRESS", "ipc:///tmp/mx/engine.sock", _zmq_address,
        "Base ZMQ address of the engine hook; rank r uses `<base>-r.sock` (ipc) or port+r (tcp).")
    allow_tcp_hook: bool = setting("MX_ALLOW_TCP_HOOK", False, _flag,
        "Allow a tcp:// MX_ZMQ_ADDRESS (anything that reaches the port can drive the engine); default: ipc only, in a "
        "0700 directory the hook creates.")
    model_name: str = setting("MX_MODEL_NAME", "", _text,
        "Model label for logs and metrics; default: the model id the engine reports.")
    redis_url: str = setting("MX_REDIS_URL", "redis://127.0.0.1:6379/0", _redis_url,  # shown only redacted
        "Redis (or Valkey) holding leases, the source registry and heartbeats.", repr=False)
    redis_username: str = setting("MX_REDIS_USERNAME", "", _text,
        "Redis ACL user (empty: the URL's user, else `default`).")
    redis_password_file: str = setting("MX_REDIS_PASSWORD_FILE", "", _readable_file,
        "File holding the Redis password (a Kubernetes Secret mount); a password in MX_REDIS_URL also works, not both.")
    redis_tls_ca_file: str = setting("MX_REDIS_TLS_CA_FILE", "", _readable_file,
        "CA bundle that signs the Redis server's certificate (`rediss://` URLs; empty: the system CAs).")
    redis_tls_cert_file: str = setting("MX_REDIS_TLS_CERT_FILE", "", _readable_file,
        "Client certificate for Redis servers that ask for one (with MX_REDIS_TLS_KEY_FILE).")
    redis_tls_key_file: str = setting("MX_REDIS_TLS_KEY_FILE", "", _readable_file,
        "Private key of MX_REDIS_TLS_CERT_FILE.")
    redis_prefix: str = setting("MX_REDIS_PREFIX", "mx", _nonempty,
        "Key prefix, to share one Redis between clusters.")
    tp_size: int = setting("MX_TP_SIZE", 0, _non_negative_int,
        "Number of engine ranks to connect; 0 = read it from rank 0's manifest.")
    node_name: str = setting("MX_NODE_NAME", socket.gethostname(), _nonempty,
        "Node name; targets prefer sources on the same node (set from the Kubernetes downward API).")
    metrics_host: str = setting("MX_METRICS_HOST", "0.0.0.0", _text,
        "Address the HTTP server binds.")
    metrics_port: int = setting("MX_METRICS_PORT", 9400, _port,
        "Port of /metrics, /healthz, /readyz (0: any free port, logged at start).")
    source_mode: SourceMode = setting("MX_SOURCE_MODE", "auto", _choice("auto", "staged", "direct"),  # noqa: RUF009
        "`direct`: peers read engine memory; `staged`: peers read a sidecar-owned ring; `auto`: direct for DRAM, "
        "staged for CUDA-IPC-imported GPU memory.")
    staging_slots: int = setting("MX_STAGING_SLOTS", 4, _slot_count,
        f"Slots in a source's staging ring (1-{MAX_SLOTS}).")
    staging_slot_bytes: int = setting("MX_STAGING_SLOT_BYTES", 256 << 20, _slot_bytes,
        f"Bytes per staging slot, also the transfer chunk size (accepts KiB/MiB/GiB; {MIN_SLOT_BYTES >> 10} KiB to "
        f"{MAX_SLOT_BYTES >> 30} GiB).")
    engine_connect_timeout: float = setting("MX_ENGINE_CONNECT_TIMEOUT", 600.0, _positive_seconds,
        "Seconds to wait for every engine rank's socket to answer.")
    request_timeout: float = setting("MX_REQUEST_TIMEOUT", 30.0, _positive_seconds,
        "Seconds for one request to the engine hook (describe, ping, ...).")
    load_timeout: float = setting("MX_LOAD_TIMEOUT", 3600.0, _positive_seconds,
        "Seconds an engine may take to load from storage or prepare a target.")
    seed_lease_ttl: float = setting("MX_SEED_LEASE_TTL", 15.0, _positive_seconds,
        "Seconds a seeding lease lives without renewal (renewed every third of it while the seeder loads, publishes).")
    seed_wait_timeout: float = setting("MX_SEED_WAIT_TIMEOUT", 1800.0, _positive_seconds,
        "Seconds a replica waits for another replica's seeding before it loads from storage itself.")
    heartbeat_interval: float = setting("MX_HEARTBEAT_INTERVAL", 2.0, _positive_seconds,
        "Seconds between a source's heartbeats.")
    source_ttl: float = setting("MX_SOURCE_TTL", 10.0, _positive_seconds,
        "Seconds after the last heartbeat that a source disappears from Redis.")
    poll_interval: float = setting("MX_POLL_INTERVAL", 0.25, _positive_seconds,
        "Seconds between Redis checks while waiting for a seeder.")
    transfer_timeout: float = setting("MX_TRANSFER_TIMEOUT", 900.0, _positive_seconds,
        "Seconds for one rank's whole transfer from one source.")
    stall_timeout: float = setting("MX_STALL_TIMEOUT", 30.0, _positive_seconds,
        "Seconds without progress before a transfer is abandoned (a wedged link reports nothing).")
    straggler_timeout: float = setting("MX_STRAGGLER_TIMEOUT", 10.0, _positive_seconds,
        "Seconds one reader may hold the other readers of a staging pass back before the source drops it (it "
        "tries another source); capped at MX_STALL_TIMEOUT.")
    fanout_readers: int = setting("MX_FANOUT_READERS", 4, _fanout,
        "Readers one staging pass of a rank feeds at once (1-64); a reader beyond is told the source is busy and "
        "waits for a place or another source (a finished target is one) instead of loading from storage; 4: the "
        "fleet model's best across 4-256 targets (docs/BENCHMARKS.md#fan-out).")
    topology: str = setting("MX_TOPOLOGY", "", _topology,
        "Where this replica sits, outermost first, `/`-separated (e.g. `zone-a/rack-7/nvl-2`; from the downward "
        "API): after the same node, targets prefer the source sharing the longest prefix, then the least loaded.")
    max_source_attempts: int = setting("MX_MAX_SOURCE_ATTEMPTS", 3, _positive_int,
        "Sources a target tries before it loads from storage.")
    max_message_bytes: int = setting("MX_MAX_MESSAGE_BYTES", 64 << 20, _bytes,
        "Largest message accepted on any socket.")
    max_metadata_bytes: int = setting("MX_MAX_METADATA_BYTES", 8 << 20, _bytes,
        "Largest NIXL agent metadata blob accepted from Redis.")
    slow_link_gbps: float = setting("MX_SLOW_LINK_GBPS", 1.0, _positive_seconds,
        "Warn when a transfer runs below this many GB/s (UCX may have fallen back to TCP).")
    sidecar_timeout: float = setting("MX_SIDECAR_TIMEOUT", 60.0, _positive_seconds,
        "Engine hook: seconds without a sidecar before the engine loads from storage by itself.")
    model_revision: str = setting("MX_MODEL_REVISION", "", _text,
        "Engine hook (vLLM): the checkpoint's name in the fingerprint (a release name or manifest digest; nothing "
        "is hashed); default: a local directory's content digest (cached beside it), a hub id's resolved commit.")
    # Compile caches beside the weights (sidecar/compile_cache, runtime_hooks/compile_cache.py; docs/VLLM.md).
    compile_cache_dir: str = setting("MX_COMPILE_CACHE_DIR", "", _abs_dir,
        "The engine's compile cache root, mounted in both containers (vLLM: equal to VLLM_CACHE_ROOT): a replica "
        "installs a live source's cache of the same key here before the engine compiles, and publishes its own once "
        "the engine serves. Needs MX_AUTH_KEY_FILE (caches are code); empty: off.")
    engine_ready_url: str = setting("MX_ENGINE_READY_URL", "", _ready_url,
        "An http(s):// URL that answers 200 once the engine serves (vLLM: `http://127.0.0.1:8000/health`) or a "
        "file:// path that exists then: ends `mx_time_to_serve_seconds` and lets the compile cache be published; "
        "empty: neither.")
    compile_cache_wait: float = setting("MX_COMPILE_CACHE_WAIT", 30.0, _positive_seconds,
        "Engine hook: seconds the engine waits, after its weights, for the sidecar's compile cache verdict (one "
        "look for a live cache of its key, the receive, the install) before it compiles on its own; also the first "
        "process's wait, before vLLM builds its config, for modelinfos/ asked for ahead.")
    compile_cache_settle: float = setting("MX_COMPILE_CACHE_SETTLE", 10.0, _positive_seconds,
        "Seconds the cache root must stay unchanged, after the engine serves, before its cache is published.")
    # TensorRT-LLM checkpoints and model directories, file level (runtime_hooks/engines/trtllm, runtime_hooks/files).
    trtllm_model_name: str = setting("MX_TRTLLM_MODEL_NAME", "", _text,
        "TRT-LLM / model files: the name a publisher announces and a loader asks for; default: MX_MODEL_NAME.")
    trtllm_checkpoint_dir: str = setting("MX_TRTLLM_CHECKPOINT_DIR", "", _text,
        "Publisher: the TRT-LLM checkpoint (or model) directory it serves; loader: where it writes the received files "
        "(default: `<MX_TRTLLM_OUTPUT_DIR>/checkpoint`).")
    trtllm_output_dir: str = setting("MX_TRTLLM_OUTPUT_DIR", "/tmp/mx_trtllm", _text,
        "Loader: root of the received checkpoint (`checkpoint/`), the engine (`engine/`) and the build log.")
    trtllm_devices: str = setting("MX_TRTLLM_DEVICES", "auto", _devices,
        "Where the file bytes live: `cpu` (shared memory), `cuda` (rank r on GPU r mod count), a list "
        "(`cuda:0,cuda:1`), or `auto` (publisher: GPUs if any; loader: the source's memory kind).")
    trtllm_source_timeout: float = setting("MX_TRTLLM_SOURCE_TIMEOUT", 3600.0, _positive_seconds,
        "Loader: seconds to wait for a source of the model before `Source not found`.")
    trtllm_build_command: str = setting("MX_TRTLLM_BUILD_COMMAND", "trtllm-build", _nonempty,
        "Loader: the engine builder run on the received checkpoint (looked up on PATH).")
    trtllm_max_batch_size: int = setting("MX_TRTLLM_MAX_BATCH_SIZE", 8, _positive_int,
        "trtllm-build `--max_batch_size`.")
    trtllm_max_input_len: int = setting("MX_TRTLLM_MAX_INPUT_LEN", 2048, _positive_int,
        "trtllm-build `--max_input_len`.")
    trtllm_max_seq_len: int = setting("MX_TRTLLM_MAX_SEQ_LEN", 4096, _positive_int,
        "trtllm-build `--max_seq_len`.")
    trtllm_max_num_tokens: int = setting("MX_TRTLLM_MAX_NUM_TOKENS", 0, _non_negative_int,
        "trtllm-build `--max_num_tokens`; 0: not passed (trtllm-build's default).")
    trtllm_gemm_plugin: str = setting("MX_TRTLLM_GEMM_PLUGIN", "auto", _plugin,
        "trtllm-build `--gemm_plugin`.")
    trtllm_build_workers: int = setting("MX_TRTLLM_BUILD_WORKERS", 0, _non_negative_int,
        "trtllm-build `--workers`; 0: not passed (one worker).")
    trtllm_build_args: str = setting("MX_TRTLLM_BUILD_ARGS", "", _args,
        "Extra trtllm-build arguments, shell-quoted, appended last (e.g. `--use_paged_context_fmha enable`).")
    trtllm_build_timeout: float = setting("MX_TRTLLM_BUILD_TIMEOUT", 7200.0, _positive_seconds,
        "Loader: seconds trtllm-build may run before it is stopped and the build counts as failed.")
    log_level: str = setting("MX_LOG_LEVEL", "info", _choice("debug", "info", "warning", "error"),
        "debug, info, warning or error.")
    log_format: str = setting("MX_LOG_FORMAT", "text", _choice("text", "json"),
        "`text` (one line per event) or `json` (one object per line: ts, level, logger, msg and the fields of the "
        "text line's prefix: model, role, rank, peer; phase and phase_s for `phase=` lines).")
    auth_key_file: str = setting("MX_AUTH_KEY_FILE", "", _text,
        "File holding the deployment key (>= 32 bytes, a Kubernetes Secret) that authenticates Redis records, peer "
        "messages and engine commands; empty: everything runs UNAUTHENTICATED (logged, in metrics).")
    test_failpoints: str = setting("MX_TEST_FAILPOINTS", "", _text,
        "Tests only: `name=action,...` fault injection (sidecar/failpoints.py); never set in production.")


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.metadata["env"], f.name, f.default, f.metadata["help"], f.metadata["parse"])
    for f in dataclasses.fields(Settings))
BY_ENV = {s.env: s for s in SETTINGS}


def parse_env(env: Mapping[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Each setting's value from `env` (default: os.environ): the parsed values by field, and the errors."""
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
    return values, errors


_DECLARED = object()


def get(name: str, env: Mapping[str, str] | None = None, *, default: Any = _DECLARED) -> Any:
    """One setting by its variable, parsed (for code that needs a single value, not a whole Config); unset or
    empty: `default`, else the declared default."""
    s = BY_ENV[name]
    raw = (os.environ if env is None else env).get(name)
    if raw is None or raw == "":
        return s.default if default is _DECLARED else default
    try:
        return s.parse(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r}: {e}") from None


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = "hostname" if s.env == "MX_NODE_NAME" else (s.default if s.default != "" else "(empty)")
        rows.append(f"| `{s.env}` | `{default}` | {s.help} |")
    return "\n".join(rows)
