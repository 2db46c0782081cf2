"""`mx-sidecar run | status | doctor | config | bench | demo` (also `python -m sidecar ...`); `--version`."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import signal
import sys

from sidecar.config import cli_config
from sidecar.settings import ConfigError, markdown_table, redact_url


def _version() -> str:
    """The installed distribution's version (pyproject.toml's `name`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mx-sidecar")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mx-sidecar", description="GPU-to-GPU weight transfer sidecar")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="run the daemon for the engine at MX_ZMQ_ADDRESS")
    st_p = sub.add_parser("status", help="the fleet in MX_REDIS_URL: models, sources, seeding, targets in flight")
    st_p.add_argument("--model", help="only this model")
    st_p.add_argument("--json", action="store_true", help="machine-readable (one object per line with --watch)")
    st_p.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                      help="refresh every SECONDS (default 2) until interrupted")
    st_p.add_argument("--explain", action="store_true",
                      help="for a model with several fingerprints: the fields in which they differ")
    sub.add_parser("bench", help="CPU benchmark on this machine (as `make bench`)", add_help=False)
    sub.add_parser("demo", help="end-to-end demo on this machine (as `make demo`)", add_help=False)
    cfg_p = sub.add_parser("config", help="validate the MX_* environment and print it")
    cfg_p.add_argument("--markdown", action="store_true", help="print the settings table for the README")
    doc_p = sub.add_parser("doctor", help="check Redis, the key file, the socket directory, /dev/shm, UCX, RDMA, GPUs")
    doc_p.add_argument("--json", action="store_true", help="one JSON object per check per line")
    doc_p.add_argument("--model-bytes", type=int, help="warn when /dev/shm is smaller than this")
    args, rest = p.parse_known_args(argv)
    if args.cmd in ("bench", "demo"):
        from importlib import import_module

        return int(import_module(f"sidecar.{args.cmd}").main(rest))
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "config" and args.markdown:
        print(markdown_table())
        return 0
    cfg = cli_config("mx-sidecar")
    if cfg is None:
        return 2
    if args.cmd == "config":
        for k, v in vars(cfg).items():
            print(f"{k} = {redact_url(v) if k == 'redis_url' else v!r}")
        return 0
    if args.cmd == "doctor":
        from sidecar.doctor import main as doctor

        return doctor(cfg, args.json, args.model_bytes)
    if args.cmd == "status":
        from redis.exceptions import RedisError  # the sidecar extra

        from sidecar.fleet import status
        from sidecar.redis_client import describe_error

        try:
            return asyncio.run(status(cfg, args.model, args.json, args.watch, args.explain))
        except KeyboardInterrupt:
            return 0
        except (RedisError, OSError) as e:
            print(f"mx-sidecar: cannot read {redact_url(cfg.redis_url)}: {describe_error(e)}", file=sys.stderr)
            return 1
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how a hung daemon tells where it hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    faulthandler.enable()  # a crash in native code (NIXL, UCX, CUDA) leaves its Python stack in the log
    try:
        from sidecar.daemon import run_daemon
    except ImportError as e:  # the engine-side install has no Redis/NIXL/Prometheus client
        print(f"mx-sidecar: {e}; the daemon needs the sidecar extra: pip install 'mx-sidecar[sidecar,nixl-cu13]'",
              file=sys.stderr)
        return 2
    try:
        return run_daemon(cfg)
    except ConfigError as e:  # e.g. a secret file that cannot be read
        print(f"mx-sidecar: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
