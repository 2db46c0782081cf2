"""TRT-LLM checkpoints and model directories through real parts: publisher process + its sidecar, loader process + its
sidecar, a real Redis (valkey), real NIXL over DRAM, a real (fake) trtllm-build executable on PATH."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis

from runtime_hooks.files.layout import FileSpec, rank_fingerprint
from sidecar.contract.auth import Keyring
from sidecar.contract.codec import encode
from sidecar.contract.messages import RankSource, SourceRecord, TensorEntry, replica_fingerprint
from sidecar.coordinator import open_record
from tests.trtllm.checkpoints import SMALL_CKPT, digests, make_model_dir, make_trtllm_checkpoint
from tests.trtllm.procs import FilesNode, write_fake_trtllm_build

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TP=2, ~155 MB: bf16, FP8 (float8_e4m3fn + per-tensor scales) and INT8 (+ per-channel scales) layers."""
    return make_trtllm_checkpoint(tmp_path_factory.mktemp("ckpt"), 2)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trtllm_checkpoint(tmp_path_factory.mktemp("ckpt-small"), 2, SMALL_CKPT, seed=1)


@pytest.fixture
def nodes(redis_server, tmp_path):  # type: ignore[no-untyped-def]
    made: list[FilesNode] = []

    def start(name: str, args: list[str], extra_env: dict[str, str] | None = None, sidecar: bool = True) -> FilesNode:
        n = FilesNode(name, args, tmp_path, redis_server.url, extra_env, sidecar)
        made.append(n)
        return n

    yield start
    for n in reversed(made):
        n.stop()


def _publish(nodes, name: str, directory: Path, model: str, *extra: str) -> FilesNode:  # type: ignore[no-untyped-def]
    pub = nodes(name, ["publish", str(directory), "--model-name", model, *extra])
    assert pub.result("MX_PUBLISHED")["outcomes"] == ["loaded"] * len(pub.result("MX_PUBLISHED")["devices"])
    assert pub.sidecar is not None
    pub.sidecar.wait_for(r"serving as a source", 60)
    return pub


def _builder_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    write_fake_trtllm_build(tmp_path / "bin")
    return {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_TRTLLM_ARGV": str(tmp_path / "argv.json"),
            **extra}


def test_a_tp2_checkpoint_arrives_byte_identical_and_is_built_with_exactly_the_configured_options(nodes, ckpt,
                                                                                                 tmp_path):
    _publish(nodes, "pub", ckpt, "llama-trt")
    out = tmp_path / "out"
    build = {"MX_TRTLLM_MAX_BATCH_SIZE": "16", "MX_TRTLLM_MAX_INPUT_LEN": "1000", "MX_TRTLLM_MAX_SEQ_LEN": "3000",
             "MX_TRTLLM_MAX_NUM_TOKENS": "8192", "MX_TRTLLM_GEMM_PLUGIN": "bfloat16", "MX_TRTLLM_BUILD_WORKERS": "2",
             "MX_TRTLLM_BUILD_ARGS": "--use_paged_context_fmha enable --log_level 'verbose'"}
    tgt = nodes("tgt", ["load", "--model-name", "llama-trt", "--output-dir", str(out)],
                {**_builder_env(tmp_path), **build})
    res = tgt.result("MX_LOADED")
    assert tgt.exit_code() == 0
    assert res["path"] == str(out / "engine") and res["form"] == "trtllm-checkpoint"
    assert digests(out / "checkpoint") == digests(ckpt)  # config.json, quant_cfg.json, rank0/1.safetensors
    assert (out / "checkpoint" / "config.json").read_bytes() == (ckpt / "config.json").read_bytes()
    assert json.loads((tmp_path / "argv.json").read_text()) == [
        "--checkpoint_dir", str(out / "checkpoint"), "--output_dir", str(out / "engine"), "--max_batch_size", "16",
        "--max_input_len", "1000", "--max_seq_len", "3000", "--max_num_tokens", "8192", "--gemm_plugin", "bfloat16",
        "--workers", "2", "--use_paged_context_fmha", "enable", "--log_level", "verbose"]
    assert sorted(os.listdir(out / "engine")) == ["config.json", "rank0.engine", "rank1.engine"]
    for line in ("Querying for source model: llama-trt", "Found source with 2 workers", "Receiving rank 0: 3 tensors",
                 "Receiving rank 1: 1 tensors", r"Rank 0: Received 0\.08 GB in [\d.]+s \([\d.]+ Gbps\)",
                 r"Rank 1: Received 0\.08 GB in", r"Transfer complete: 0\.16 GB total in [\d.]+s \([\d.]+ Gbps\)",
                 r"Building TRT-LLM engine from checkpoint\.\.\.", rf"Engine built in [\d.]+s at {out / 'engine'}"):
        tgt.proc.wait_for(line, 1)
    assert tgt.sidecar is not None
    tgt.sidecar.wait_for(r"phase=receive 0\.16 GB .* every checksum verified", 1)
    tgt.sidecar.wait_for(r"serving as a source", 10)  # the loader's files now serve later loaders too

    # A second loader, whose trtllm-build fails: exit 5 with the builder's code and output, the checkpoint stays.
    out2 = tmp_path / "out2"
    bad = nodes("bad", ["load", "--model-name", "llama-trt", "--output-dir", str(out2)],
                _builder_env(tmp_path, FAKE_TRTLLM_FAIL="1"))
    assert bad.exit_code() == 5
    bad.proc.wait_for(r"engine build failed: .*failed with code 7 .*stays in " + str(out2 / "checkpoint"), 1)
    bad.proc.wait_for(r"out of memory while building rank 1", 1)  # the tail of the builder's output
    assert digests(out2 / "checkpoint") == digests(ckpt)


def test_a_loader_started_before_any_source_waits_receives_and_keeps_the_checkpoint_without_trtllm_build(
        nodes, small_ckpt, tmp_path):
    out = tmp_path / "out"
    tgt = nodes("tgt", ["load", "--model-name", "late-src", "--output-dir", str(out)],
                {"PATH": f"{tmp_path / 'empty-bin'}:/usr/bin:/bin", "MX_TRTLLM_SOURCE_TIMEOUT": "120"})
    tgt.proc.wait_for(r"Querying for source model: late-src", 60)
    time.sleep(2)
    assert tgt.proc.p.poll() is None and not out.joinpath("checkpoint", "config.json").exists()
    _publish(nodes, "pub", small_ckpt, "late-src")
    assert tgt.exit_code(120) == 5
    tgt.proc.wait_for(r"trtllm-build not found on PATH .*TensorRT-LLM <= 1\.2.*--skip-build.*stays in "
                      + str(out / "checkpoint"), 1)
    assert digests(out / "checkpoint") == digests(small_ckpt)


def test_without_a_source_the_loader_stops_with_source_not_found_and_writes_nothing(nodes, tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    tgt = nodes("tgt", ["load", "--model-name", "nobody-publishes-this", "--output-dir", str(out),
                        "--source-timeout", "2"], sidecar=False)
    assert tgt.exit_code(60) == 3
    tgt.proc.wait_for(r"Source not found for nobody-publishes-this after 2s", 1)
    assert time.monotonic() - t0 < 30
    assert not out.exists() or not any(out.rglob("*.safetensors"))


def _forge(url: str, model: str, key: Keyring) -> None:
    """Whoever can write Redis republishes the real source's agent with one file 4 KiB longer and a recomputed
    (unkeyed) fingerprint, twice, so that a loader prefers it over the real record; sealed with `key` (without the
    deployment key when `key` has none: then nothing tells the forgery apart)."""
    r = redis.Redis.from_url(url)
    key_name = next(iter(r.scan_iter("mx:*:src:*"))).decode()
    rec = open_record(Keyring(None), key_name, r.get(key_name), 1 << 26)
    ranks, specs = [], []
    for rs in sorted(rec.ranks, key=lambda x: x.rank):
        entries = [TensorEntry(e.name, e.dtype, [e.nbytes + 4096] if rs.rank == 1 else e.shape, e.handle, e.offset,
                               e.nbytes + 4096 if rs.rank == 1 else e.nbytes) for e in rs.entries]
        ranks.append(RankSource(rs.rank, rs.agent, rs.mem_type, rs.device_id, rs.mode, entries, list(rs.checksums),
                                entry_addrs=list(rs.entry_addrs)))
        specs.append([FileSpec(e.name.rpartition("@sha256:")[0], e.nbytes, e.name.rpartition(":")[2])
                      for e in entries])
    fp = replica_fingerprint([rank_fingerprint(model, "trtllm-checkpoint", i, s, 2, "cpu")
                              for i, s in enumerate(specs)])
    for rid in ("forger-1", "forger-2"):
        k = f"mx:{fp}:src:{rid}"
        r.set(k, key.seal("record", k, encode(SourceRecord(rec.v, rid, rec.node, model, fp, ranks))), px=600_000)
        r.set(f"mx:{fp}:hb:{rid}", f"{time.time()!r} 600.0", px=600_000)
        r.sadd(f"mx:{fp}:sources", rid)


def test_without_a_deployment_key_forged_sizes_in_redis_only_make_the_receive_fail_and_nothing_is_written(
        nodes, small_ckpt, tmp_path, redis_server):
    _publish(nodes, "pub", small_ckpt, "forged")
    _forge(redis_server.url, "forged", Keyring(None))
    out = tmp_path / "out"
    tgt = nodes("tgt", ["load", "--model-name", "forged", "--output-dir", str(out), "--skip-build"])
    assert tgt.exit_code(120) == 4
    tgt.proc.wait_for(r"transfer failed: no source delivered verified bytes of forged", 1)
    assert tgt.sidecar is not None
    tgt.sidecar.wait_for(r"source (refused|failed)", 1)
    assert not any(p.is_file() for p in out.rglob("*")), "no file may appear"


def test_with_a_deployment_key_forged_records_are_refused_and_the_loader_takes_the_real_files(
        nodes, small_ckpt, tmp_path, redis_server):
    keyfile = tmp_path / "key"
    keyfile.write_bytes(os.urandom(32).hex().encode())
    keyfile.chmod(0o600)
    env = {"MX_AUTH_KEY_FILE": str(keyfile)}
    pub = nodes("pub", ["publish", str(small_ckpt), "--model-name", "signed"], env)
    pub.result("MX_PUBLISHED")
    assert pub.sidecar is not None
    pub.sidecar.wait_for(r"serving as a source", 60)
    _forge(redis_server.url, "signed", Keyring(os.urandom(32)))  # sealed, but not with the deployment key
    out = tmp_path / "out"
    tgt = nodes("tgt", ["load", "--model-name", "signed", "--output-dir", str(out), "--skip-build"], env)
    assert tgt.exit_code(120) == 0
    tgt.proc.wait_for(r"refused 2 source records that are not sealed with this deployment key", 1)
    assert digests(out / "checkpoint") == digests(small_ckpt)


def test_a_loader_whose_sidecar_dies_mid_transfer_gives_up_instead_of_hanging_and_writes_nothing(
        nodes, small_ckpt, tmp_path):
    _publish(nodes, "pub", small_ckpt, "orphan")
    out = tmp_path / "out"
    tgt = nodes("tgt", ["load", "--model-name", "orphan", "--output-dir", str(out), "--skip-build"],
                {"MX_TEST_FAILPOINTS": "before_read=sleep:60", "MX_SIDECAR_TIMEOUT": "2"})
    assert tgt.sidecar is not None
    tgt.sidecar.wait_for(r"failpoint before_read", 60)  # prepared, about to READ into the loader's buffers
    tgt.sidecar.signal(signal.SIGKILL)
    t0 = time.monotonic()
    assert tgt.exit_code(60) == 4
    assert time.monotonic() - t0 < 30
    tgt.proc.wait_for(r"went silent mid-transfer and no new sidecar took over; nothing was written", 1)
    tgt.proc.wait_for(r"receive buffers .* stay allocated until this process exits", 1)
    assert not any(p.is_file() for p in out.rglob("*"))


def test_a_model_directory_round_trips_byte_identical_over_two_ranks_with_child_sidecars(nodes, tmp_path,
                                                                                          redis_server):
    src = make_model_dir(tmp_path / "hf")
    pub = nodes("pub", ["publish", str(src), "--model-name", "tiny-hf", "--ranks", "2", "--with-sidecar"],
                sidecar=False)
    meta = pub.result("MX_PUBLISHED")
    assert meta["form"] == "model-dir" and meta["ranks"] == 2 and meta["files"] == 8
    pub.proc.wait_for(r"serving as a source", 60)  # the child sidecar logs to the same stream
    out = tmp_path / "received"
    tgt = nodes("tgt", ["load", "--model-name", "tiny-hf", "--checkpoint-dir", str(out), "--with-sidecar"],
                sidecar=False)
    res = tgt.result("MX_LOADED")
    assert tgt.exit_code() == 0
    assert res["path"] == str(out) and res["form"] == "model-dir" and res["build_s"] is None
    assert digests(out) == digests(src) and len(digests(out)) == 8
    assert (out / "generation_config.json").read_bytes() == b""
    assert not (out / ".cache").exists() and not (out / ".gitattributes").exists()
    assert not list(out.glob(".mx-incoming-*"))
    # The child sidecar ends with the loader (SIGTERM; killed after 15 s if it hangs) and its source record goes
    # (withdrawn, or expired within MX_SOURCE_TTL): only the publisher's remains.
    r = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 25
    while len(list(r.scan_iter("mx:*:src:*"))) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(list(r.scan_iter("mx:*:src:*"))) == 1


def test_a_reused_destination_ends_with_exactly_the_published_files_and_a_planted_link_is_refused(
        nodes, small_ckpt, tmp_path):
    import json

    from runtime_hooks.files.install import COMPLETE

    _publish(nodes, "pub", small_ckpt, "reuse")
    out = tmp_path / "out"
    # An earlier receive of another model: its marker lists a file the new model lacks (a stale shard index).
    out.mkdir()
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"x": "old-00001.safetensors"}}')
    (out / COMPLETE).write_text(json.dumps({"v": 1, "model": "old", "files": {"model.safetensors.index.json": "0"}}))
    tgt = nodes("tgt", ["load", "--model-name", "reuse", "--checkpoint-dir", str(out), "--skip-build"])
    assert tgt.exit_code(120) == 0
    assert digests(out) == digests(small_ckpt), "exactly the published set: the stale index is gone"
    assert set(json.loads((out / COMPLETE).read_text())["files"]) == set(digests(small_ckpt))
    assert not list(out.glob(".mx-incoming-*")) and not (out / ".mx-installing").exists()
    # A link nobody's receive wrote (planted): the next receive refuses the destination and writes nothing there.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "tokenizer").symlink_to(elsewhere, target_is_directory=True)
    again = nodes("again", ["load", "--model-name", "reuse", "--checkpoint-dir", str(out), "--skip-build"])
    assert again.exit_code(120) != 0
    again.proc.wait_for(r"neither the source published nor an earlier receive wrote", 1)
    assert not any(elsewhere.iterdir()) and digests(out) == digests(small_ckpt)
