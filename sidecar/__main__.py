"""`mx-sidecar run | status | config | bench | demo` (also `python -m sidecar ...`)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from sidecar.config import Config, ConfigError, markdown_table
from sidecar.logs import setup_logging
from sidecar.redis_client import redact_url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mx-sidecar", description="GPU-to-GPU weight transfer sidecar")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="run the daemon for the engine at MX_ZMQ_ADDRESS")
    sub.add_parser("status", help="list the live sources registered in MX_REDIS_URL")
    sub.add_parser("bench", help="CPU benchmark on this machine (as `make bench`)", add_help=False)
    sub.add_parser("demo", help="end-to-end demo on this machine (as `make demo`)", add_help=False)
    cfg_p = sub.add_parser("config", help="validate the MX_* environment and print it")
    cfg_p.add_argument("--markdown", action="store_true", help="print the settings table for the README")
    args, rest = p.parse_known_args(argv)
    if args.cmd in ("bench", "demo"):
        from importlib import import_module

        return int(import_module(f"sidecar.{args.cmd}").main(rest))
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "config" and args.markdown:
        print(markdown_table())
        return 0
    try:
        cfg = Config.from_env()
    except ConfigError as e:
        print(f"mx-sidecar: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    if args.cmd == "config":
        for k, v in vars(cfg).items():
            print(f"{k} = {redact_url(v) if k == 'redis_url' else v!r}")
        return 0
    if args.cmd == "status":
        from redis.exceptions import RedisError

        from sidecar.redis_client import describe_error

        try:
            return asyncio.run(_status(cfg))
        except (RedisError, OSError) as e:
            print(f"mx-sidecar: cannot read {redact_url(cfg.redis_url)}: {describe_error(e)}", file=sys.stderr)
            return 1
        except ConfigError as e:
            print(f"mx-sidecar: {e}", file=sys.stderr)
            return 2
    from sidecar.daemon import run_daemon

    try:
        return run_daemon(cfg)
    except ConfigError as e:  # e.g. a secret file that cannot be read
        print(f"mx-sidecar: {e}", file=sys.stderr)
        return 2


async def _status(cfg: Config) -> int:
    from sidecar.auth import AuthError, Keyring
    from sidecar.coordinator import open_record
    from sidecar.protocol import ProtocolError
    from sidecar.redis_client import connect

    keys = Keyring.from_file(cfg.auth_key_file)
    auth = "authenticated with the deployment key" if keys.enabled else "UNAUTHENTICATED (no MX_AUTH_KEY_FILE)"
    print(f"records: {auth}")
    r = connect(cfg)
    try:
        found = 0
        async for key in r.scan_iter(match=f"{cfg.redis_prefix}:*:src:*"):
            blob = await r.get(key)
            if blob is None:
                continue
            try:
                rec = open_record(keys, key.decode(), blob if isinstance(blob, bytes) else blob.encode(),
                                  cfg.max_message_bytes)
            except AuthError as e:
                print(f"{key.decode()}: REFUSED, not authenticated ({e.reason})")
                continue
            except ProtocolError as e:
                print(f"{key.decode()}: unreadable ({e})")
                continue
            found += 1
            modes = ",".join(sorted({x.mode for x in rec.ranks}))
            print(f"{rec.model}  fingerprint={rec.fingerprint[:12]}  replica={rec.replica}  node={rec.node}  "
                  f"ranks={len(rec.ranks)}  mode={modes}")
        if not found:
            print("no live sources")
        return 0
    finally:
        await r.aclose()


if __name__ == "__main__":
    sys.exit(main())
