"""`mx-trtllm publish | load` (also `python -m runtime_hooks.engines.trtllm.cli ...`).

    mx-trtllm publish /models/llama/trtllm-ckpt --model-name llama     # serves until SIGTERM
    mx-trtllm load --model-name llama --output-dir /tmp/mx_trtllm       # receive, verify, trtllm-build, exit

Both talk to the sidecar beside them through MX_ZMQ_ADDRESS (start `mx-sidecar run` next to them, or pass
`--with-sidecar` to run one as a child process, e.g. in a one-shot init container). Every MX_* setting applies;
flags override the MX_TRTLLM_* ones. On success one JSON line goes to stdout (`MX_PUBLISHED {...}` /
`MX_LOADED {...}`); logs go to stderr.
Exit status: 0 ok, 2 bad settings, 3 source not found, 4 transfer failed, 5 engine build failed, 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

from sidecar.config import Config, cli_config

log = logging.getLogger("mx.trtllm")

EXIT_SOURCE_NOT_FOUND = 3
EXIT_TRANSFER_FAILED = 4
EXIT_BUILD_FAILED = 5


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mx-trtllm", description="TensorRT-LLM checkpoints and model directories, "
                                "peer to peer through the mx sidecar")
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="hold a checkpoint/model directory in memory and serve it until SIGTERM")
    pub.add_argument("checkpoint_dir", nargs="?", help="default: MX_TRTLLM_CHECKPOINT_DIR")
    pub.add_argument("--form", default="auto", choices=["auto", "trtllm-checkpoint", "model-dir"])
    pub.add_argument("--ranks", type=int, default=1, help="model-dir form: spread the weight shards over N ranks")
    ld = sub.add_parser("load", help="receive a published checkpoint/model directory, verify it, build the engine")
    ld.add_argument("--output-dir", help="default: MX_TRTLLM_OUTPUT_DIR")
    ld.add_argument("--checkpoint-dir", help="where the received files go (default: <output-dir>/checkpoint)")
    ld.add_argument("--skip-build", action="store_true", help="receive the checkpoint only")
    ld.add_argument("--serve", action="store_true", help="keep serving the received files until SIGTERM")
    ld.add_argument("--source-timeout", type=float, help="default: MX_TRTLLM_SOURCE_TIMEOUT")
    for sp in (pub, ld):
        sp.add_argument("--model-name", help="default: MX_TRTLLM_MODEL_NAME, else MX_MODEL_NAME")
        sp.add_argument("--devices", help="default: MX_TRTLLM_DEVICES (auto | cpu | cuda | cuda:0,cuda:1)")
        sp.add_argument("--sidecar-timeout", type=float, help="default: MX_SIDECAR_TIMEOUT")
        sp.add_argument("--with-sidecar", action="store_true",
                        help="run `python -m sidecar run` as a child process with this environment")
    return p


@contextlib.contextmanager
def _child_sidecar(enabled: bool) -> Iterator[Callable[[], None]]:
    """Yields a function that stops the child sidecar (SIGTERM: it withdraws from Redis); called again on exit."""
    if not enabled:
        yield lambda: None
        return
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], env=os.environ.copy())
    log.info("started the sidecar as child process %d", proc.pid)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    try:
        yield stop
    finally:
        stop()


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack to stderr
    faulthandler.enable()  # and a native crash's
    cfg = cli_config("mx-trtllm")
    if cfg is None:
        return 2
    from runtime_hooks.engines.trtllm.files import EngineBuildError, TrtllmSourcePublisher, TrtllmTargetLoader
    from runtime_hooks.files.errors import FilesError, SourceNotFound, TransferFailed

    try:
        with _child_sidecar(args.with_sidecar) as stop_sidecar:
            if args.cmd == "publish":
                return _publish(args, cfg, TrtllmSourcePublisher, stop_sidecar)
            return _load(args, cfg, TrtllmTargetLoader, stop_sidecar)
    except SourceNotFound as e:
        log.error("%s", e)
        return EXIT_SOURCE_NOT_FOUND
    except TransferFailed as e:
        log.error("%s", e)
        return EXIT_TRANSFER_FAILED
    except EngineBuildError as e:
        log.error("engine build failed: %s", e)
        return EXIT_BUILD_FAILED
    except (FilesError, ValueError, OSError) as e:
        log.error("%s", e)
        return 1


def _publish(args: argparse.Namespace, cfg: Config, cls, stop_sidecar: Callable[[], None]) -> int:  # type: ignore[no-untyped-def]
    pub = cls(args.checkpoint_dir, args.model_name, form=args.form, ranks=args.ranks, devices=args.devices,
              config=cfg)
    try:
        pub.initialize(args.sidecar_timeout)
        p = pub.publisher
        print("MX_PUBLISHED " + json.dumps({
            "model": pub.model_name, "form": pub.form, "ranks": len(p.plan), "files": sum(map(len, p.plan)),
            "bytes": pub.total_bytes, "devices": p.devices, "outcomes": pub.outcomes, "load_s": round(p.load_s, 3)}),
            flush=True)
        _wait_for_signal()
        return 0
    finally:
        stop_sidecar()  # first: it withdraws this source before the memory goes away
        pub.shutdown()


def _load(args: argparse.Namespace, cfg: Config, cls, stop_sidecar: Callable[[], None]) -> int:  # type: ignore[no-untyped-def]
    loader = cls(args.model_name, args.output_dir, args.checkpoint_dir, devices=args.devices,
                 source_timeout=args.source_timeout, config=cfg)
    try:
        path = loader.load(skip_build=args.skip_build, sidecar_timeout=args.sidecar_timeout)
        r = loader.result
        print("MX_LOADED " + json.dumps({
            "path": path, "model": r.model, "form": r.form, "files": r.files, "bytes": r.bytes,
            "query_s": round(r.query_s, 3), "receive_s": round(r.receive_s, 3),
            "hash_write_s": round(r.hash_write_s, 3), "total_s": round(r.total_s, 3), "gbps": round(r.gbps, 3),
            "build_s": None if loader.build_s is None else round(loader.build_s, 3),
            "devices": r.devices, "ranks": [vars(x) for x in r.ranks]}), flush=True)
        if args.serve:
            log.info("serving the received files until SIGTERM")
            _wait_for_signal()
        return 0
    finally:
        stop_sidecar()
        loader.shutdown()


if __name__ == "__main__":
    sys.exit(main())
