"""File-level publication and the TRT-LLM layer, piece by piece: settings, plans, fingerprints from records, forged
records, the target's no-source verdict, and the engine build step with a real (fake) trtllm-build on PATH."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import sys
from pathlib import Path

import pytest
import torch

from runtime_hooks.engines.trtllm.files import BuildFailed, BuildOptions, BuildToolMissing, build_command, build_engine
from runtime_hooks.exposure import build_manifest, compute_fingerprint
from runtime_hooks.files.buffers import resolve_devices, usable_mem_types
from runtime_hooks.files.errors import FilesError, SourceNotFound, TransferFailed
from runtime_hooks.files.install import COMPLETE, INSTALLING, STAGING_PREFIX, install, make_staging, read_marker
from runtime_hooks.files.layout import (
    FileSpec,
    LayoutError,
    detect_form,
    layout_from_record,
    list_files,
    plan_ranks,
    rank_fingerprint,
)
from runtime_hooks.files.publisher import FileSourceAdapter
from runtime_hooks.files.receiver import FileTargetAdapter
from runtime_hooks.hook import RankHook
from sidecar.config import Config
from sidecar.contract.codec import PROTOCOL_VERSION
from sidecar.contract.messages import RankSource, SourceRecord, TensorEntry, replica_fingerprint
from sidecar.settings import ConfigError
from tests.trtllm.checkpoints import SMALL_CKPT, digests, make_model_dir, make_trtllm_checkpoint
from tests.trtllm.procs import write_fake_trtllm_build


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trtllm_checkpoint(tmp_path_factory.mktemp("ckpt-small"), 2, SMALL_CKPT)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("hf"))


# ------------------------------------------------------------------------------------------------ settings


def test_trtllm_settings_default_to_the_original_examples_build_options():
    cfg = Config.from_env({})
    assert (cfg.trtllm_max_batch_size, cfg.trtllm_max_input_len, cfg.trtllm_max_seq_len) == (8, 2048, 4096)
    assert cfg.trtllm_gemm_plugin == "auto" and cfg.trtllm_output_dir == "/tmp/mx_trtllm"
    assert cfg.trtllm_source_timeout == 3600.0 and cfg.trtllm_devices == "auto"


@pytest.mark.parametrize("env", [{"MX_TRTLLM_DEVICES": "gpu"}, {"MX_TRTLLM_DEVICES": "cuda:0,cpu"},
                                 {"MX_TRTLLM_GEMM_PLUGIN": "float 16"}, {"MX_TRTLLM_BUILD_ARGS": "--x 'unbalanced"},
                                 {"MX_TRTLLM_MAX_BATCH_SIZE": "0"}, {"MX_TRTLLM_MAX_NUM_TOKENS": "-1"},
                                 {"MX_TRTLLM_SOURCE_TIMEOUT": "0"}, {"MX_TRTLLM_BUILD_TIMEOUT": "nan"},
                                 {"MX_TRTLLM_BUILD_COMMAND": "trtllm build"}])
def test_nonsense_trtllm_settings_are_rejected(env):
    with pytest.raises(ConfigError, match=next(iter(env))):
        Config.from_env(env)


def test_the_build_command_carries_exactly_the_configured_options():
    cfg = Config.from_env({"MX_TRTLLM_MAX_BATCH_SIZE": "16", "MX_TRTLLM_MAX_INPUT_LEN": "1000",
                           "MX_TRTLLM_MAX_SEQ_LEN": "3000", "MX_TRTLLM_MAX_NUM_TOKENS": "8192",
                           "MX_TRTLLM_GEMM_PLUGIN": "bfloat16", "MX_TRTLLM_BUILD_WORKERS": "2",
                           "MX_TRTLLM_BUILD_ARGS": "--use_paged_context_fmha enable --log_level 'verbose'"})
    cmd = build_command(BuildOptions.from_config(cfg), Path("/c"), Path("/e"))
    assert cmd == ["trtllm-build", "--checkpoint_dir", "/c", "--output_dir", "/e", "--max_batch_size", "16",
                   "--max_input_len", "1000", "--max_seq_len", "3000", "--max_num_tokens", "8192",
                   "--gemm_plugin", "bfloat16", "--workers", "2", "--use_paged_context_fmha", "enable",
                   "--log_level", "verbose"]
    plain = build_command(BuildOptions.from_config(Config.from_env({})), Path("/c"), Path("/e"))
    assert "--max_num_tokens" not in plain and "--workers" not in plain


def test_devices_resolve_per_rank_and_cuda_without_a_gpu_is_an_error():
    assert resolve_devices("cpu", 3) == ["cpu"] * 3
    assert resolve_devices("cuda:1,cuda:0", 3) == ["cuda:1", "cuda:0", "cuda:1"]
    assert usable_mem_types("cpu") == {"DRAM"} and usable_mem_types("cuda:0") == {"VRAM"}
    if not torch.cuda.is_available():
        assert resolve_devices("auto", 2) == ["cpu", "cpu"]
        assert resolve_devices("auto", 1, source_mem_type="DRAM") == ["cpu"]
        with pytest.raises(FilesError, match="no CUDA device"):
            resolve_devices("auto", 1, source_mem_type="VRAM")


# ------------------------------------------------------------------------------------------------ plans


def test_a_checkpoint_puts_each_rank_file_on_its_rank_and_every_other_file_on_rank_0(ckpt):
    assert detect_form(ckpt) == "trtllm-checkpoint"
    plan = plan_ranks(ckpt, "trtllm-checkpoint", list_files(ckpt))
    assert plan == [["config.json", "quant_cfg.json", "rank0.safetensors"], ["rank1.safetensors"]]


def test_a_checkpoint_whose_rank_files_disagree_with_its_mapping_is_refused(ckpt, tmp_path):
    for f in ckpt.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "rank2.safetensors").write_bytes(b"x")
    with pytest.raises(LayoutError, match=r"rank2\.safetensors but config\.json's mapping has world_size 2"):
        plan_ranks(tmp_path, "trtllm-checkpoint", list_files(tmp_path))
    (tmp_path / "rank2.safetensors").unlink()
    (tmp_path / "rank1.safetensors").unlink()
    with pytest.raises(LayoutError, match=r"rank1.safetensors missing"):
        plan_ranks(tmp_path, "trtllm-checkpoint", list_files(tmp_path))


def test_a_model_directory_spreads_its_shards_over_the_ranks_and_leaves_hidden_files_out(model_dir):
    assert detect_form(model_dir) == "model-dir"
    files = list_files(model_dir)
    assert ".gitattributes" not in files and not any(f.startswith(".cache") for f in files)
    assert "original/params.json" in files and "generation_config.json" in files
    plan = plan_ranks(model_dir, "model-dir", files, ranks=2)
    assert plan[1] == ["model-00002-of-00002.safetensors"]
    assert "model-00001-of-00002.safetensors" in plan[0] and "tokenizer.json" in plan[0]
    assert sorted(plan[0] + plan[1]) == sorted(files)
    with pytest.raises(LayoutError, match="rank 2 would hold no file"):
        plan_ranks(model_dir, "model-dir", files, ranks=3)


# ------------------------------------------------------------------------------------------------ records


def _record_of(adapters: list[FileSourceAdapter], mem_type: str = "DRAM") -> SourceRecord:
    """What a source sidecar publishes for these ranks (entries from the real exposed manifests)."""
    ranks, fps = [], []
    for a in adapters:
        tensors = a.discover_tensors()
        fp = compute_fingerprint(a.identity(), tensors)
        fps.append(fp)
        m = build_manifest(a.identity(), fp, tensors, expose=True)
        ranks.append(RankSource(a.identity().tp_rank, "agent", mem_type, 0, "direct", list(m.tensors), [],
                                entry_addrs=[0] * len(m.tensors)))
    return SourceRecord(PROTOCOL_VERSION, "replica-1", "node", "m", replica_fingerprint(fps), ranks)


@pytest.fixture(scope="module")
def source_adapters(ckpt) -> list[FileSourceAdapter]:
    plan = plan_ranks(ckpt, "trtllm-checkpoint", list_files(ckpt))
    return [FileSourceAdapter.load(ckpt, "m", "trtllm-checkpoint", r, 2, plan[r], "cpu") for r in range(2)]


def test_a_target_computes_the_sources_fingerprint_and_sizes_from_its_record_alone(source_adapters, ckpt):
    rec = _record_of(source_adapters)
    lay = layout_from_record(rec, "m")
    assert lay is not None and lay.form == "trtllm-checkpoint" and lay.mem_type == "DRAM"
    for r, a in enumerate(source_adapters):
        assert list(lay.ranks[r]) == a.specs
        assert rank_fingerprint("m", "trtllm-checkpoint", r, list(lay.ranks[r]), 2, "cpu") == \
            compute_fingerprint(a.identity(), a.discover_tensors())
    want = {s.path: s.sha256 for r in lay.ranks for s in r}
    assert want == digests(ckpt)
    assert layout_from_record(rec, "other-model") is None  # the model name is inside the fingerprint


def _entries(rec: SourceRecord, rank: int) -> list[TensorEntry]:
    return list(rec.ranks[rank].entries)


def _with_entries(rec: SourceRecord, rank: int, entries: list[TensorEntry], refingerprint: bool) -> SourceRecord:
    ranks = [RankSource(r.rank, r.agent, r.mem_type, r.device_id, r.mode, entries if r.rank == rank else r.entries,
                        r.checksums, entry_addrs=[0] * len(entries if r.rank == rank else r.entries))
             for r in rec.ranks]
    fp = rec.fingerprint
    if refingerprint:  # an attacker who can write Redis can recompute an unkeyed fingerprint
        specs = [[FileSpec(e.name.rpartition("@sha256:")[0], e.nbytes, e.name.rpartition(":")[2])
                  for e in r.entries] for r in ranks]
        fp = replica_fingerprint([rank_fingerprint("m", "trtllm-checkpoint", r.rank, specs[r.rank], len(ranks),
                                                   "cpu") for r in ranks])
    return SourceRecord(rec.v, rec.replica, rec.node, rec.model, fp, ranks)


def test_a_record_with_a_forged_size_and_the_old_fingerprint_is_not_taken_for_a_source(source_adapters):
    rec = _record_of(source_adapters)
    e = _entries(rec, 1)
    forged = [TensorEntry(x.name, x.dtype, [x.nbytes + 8], x.handle, x.offset, x.nbytes + 8) for x in e]
    assert layout_from_record(_with_entries(rec, 1, forged, refingerprint=False), "m") is None
    # With a recomputed fingerprint the record describes a consistent (other) layout: only the source's own layout
    # check can refuse it (tests/trtllm/test_trtllm_end_to_end.py proves it does, and nothing is written).
    lay = layout_from_record(_with_entries(rec, 1, forged, refingerprint=True), "m")
    assert lay is not None and lay.ranks[1][0].size == e[0].nbytes + 8


@pytest.mark.parametrize("bad", ["../../etc/cron.d/x", "/etc/passwd", "a/./b", "", "x\ny", ".mx-incoming-1/x",
                                 "a\\b"])
def test_a_record_naming_an_unsafe_path_is_refused_even_with_a_recomputed_fingerprint(source_adapters, bad):
    rec = _record_of(source_adapters)
    e = _entries(rec, 1)
    forged = [TensorEntry(f"{bad}@sha256:{'0' * 64}", "uint8", [5], 0, 0, 5), *e]
    try:
        lay = layout_from_record(_with_entries(rec, 1, forged, refingerprint=True), "m")
    except LayoutError:
        lay = None
    assert lay is None


def test_a_record_listing_one_path_twice_or_as_file_and_directory_is_refused(source_adapters):
    rec = _record_of(source_adapters)
    dup = [TensorEntry(f"config.json@sha256:{'1' * 64}", "uint8", [3], 0, 0, 3), *_entries(rec, 1)]
    with pytest.raises(LayoutError, match="twice"):
        layout_from_record(_with_entries(rec, 1, dup, refingerprint=True), "m")
    clash = [TensorEntry(f"config.json/x@sha256:{'1' * 64}", "uint8", [3], 0, 0, 3), *_entries(rec, 1)]
    with pytest.raises(LayoutError, match="both as a file and as a directory"):
        layout_from_record(_with_entries(rec, 1, clash, refingerprint=True), "m")


def test_entries_that_are_not_whole_uint8_files_are_not_files(source_adapters):
    rec = _record_of(source_adapters)
    e = _entries(rec, 1)
    typed = [TensorEntry(x.name, "bfloat16", [x.nbytes // 2], x.handle, x.offset, x.nbytes) for x in e]
    assert layout_from_record(_with_entries(rec, 1, typed, refingerprint=False), "m") is None


# ------------------------------------------------------------------------------------------------ target rank


def _target(tmp_path: Path, specs: tuple[FileSpec, ...]) -> FileTargetAdapter:
    import time

    return FileTargetAdapter("m", "model-dir", 0, 1, specs, "cpu", tmp_path / "staging", time.monotonic())


def test_a_target_rank_with_no_sidecar_fails_with_source_not_found_instead_of_hanging(tmp_path):
    spec = FileSpec("config.json", 4, hashlib.sha256(b"abcd").hexdigest())
    cfg = Config.from_env({"MX_ZMQ_ADDRESS": f"ipc://{tmp_path}/t.sock"})
    hook = RankHook(_target(tmp_path, (spec,)), config=cfg)
    try:
        with pytest.raises(SourceNotFound, match=r"^Source not found for m after \d+s"):
            hook.run_until_ready(sidecar_timeout=0.5)
    finally:
        hook.close()


def test_a_received_file_whose_sha256_differs_from_the_sources_fails_the_rank(tmp_path):
    good, bad = b"the right bytes", b"the wrong bytes"
    a = _target(tmp_path, (FileSpec("w.bin", len(good), hashlib.sha256(good).hexdigest()),))
    a.prepare_target()
    next(iter(a.discover_tensors().values())).copy_(torch.frombuffer(bytearray(bad), dtype=torch.uint8))
    with pytest.raises(TransferFailed, match=r"w\.bin: SHA-256 .* != the source's"):
        a.after_receive()
    with pytest.raises(TransferFailed, match="transfer failed"):
        a.load_from_storage()  # the sidecar's fallback verdict after a failed receive: a clear error


def test_a_publisher_rank_notices_a_file_changed_on_disk_since_it_was_published(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"v1 bytes")
    a = FileSourceAdapter.load(tmp_path, "m", "model-dir", 0, 1, ["f.bin"], "cpu")
    a.prepare_target()
    a.reset_for_retry()
    (tmp_path / "f.bin").write_bytes(b"v2 bytes")
    with pytest.raises(LayoutError, match="changed on disk"):
        a.load_from_storage()


# ------------------------------------------------------------------------------------------------ engine build


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_failing_trtllm_build_reports_its_exit_code_and_output_and_keeps_the_checkpoint(ckpt, tmp_path,
                                                                                          monkeypatch):
    exe = write_fake_trtllm_build(tmp_path / "bin")
    work = _copy(ckpt, tmp_path / "checkpoint")
    before = digests(work)
    monkeypatch.setenv("FAKE_TRTLLM_ARGV", str(tmp_path / "argv.json"))
    monkeypatch.setenv("FAKE_TRTLLM_FAIL", "1")
    with pytest.raises(BuildFailed, match=r"(?s)failed with code 7.*stays in .*out of memory while building"):
        build_engine(work, tmp_path / "engine", BuildOptions(command=str(exe)), tmp_path / "build.log")
    assert digests(work) == before


def test_a_build_that_exits_0_without_every_engine_file_fails_even_with_stale_engines_around(ckpt, tmp_path,
                                                                                             monkeypatch):
    exe = write_fake_trtllm_build(tmp_path / "bin")
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "rank1.engine").write_bytes(b"stale engine from an older build")
    monkeypatch.setenv("FAKE_TRTLLM_ARGV", str(tmp_path / "argv.json"))
    monkeypatch.setenv("FAKE_TRTLLM_SKIP_RANK", "1")
    with pytest.raises(BuildFailed, match=r"exited 0 but .* lacks rank1\.engine"):
        build_engine(ckpt, engine, BuildOptions(command=str(exe)), tmp_path / "build.log")


def test_a_missing_trtllm_build_names_the_fix_and_where_the_checkpoint_is(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BuildToolMissing, match=rf"trtllm-build not found on PATH.*TensorRT-LLM <= 1\.2.*in {ckpt}"):
        build_engine(ckpt, tmp_path / "engine", BuildOptions(), tmp_path / "build.log")


def test_a_build_running_past_its_timeout_is_stopped_and_fails(ckpt, tmp_path):
    exe = tmp_path / "slow-build"
    exe.write_text(f"#!{sys.executable}\nimport time\nprint('compiling...', flush=True)\ntime.sleep(60)\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(BuildFailed, match=r"(?s)longer than MX_TRTLLM_BUILD_TIMEOUT=1s.*compiling"):
        build_engine(ckpt, tmp_path / "engine", BuildOptions(command=str(exe), timeout=1.0), tmp_path / "b.log")


def test_the_fake_builder_sees_the_options_the_loader_passes(ckpt, tmp_path, monkeypatch):
    """The harness itself: what the end-to-end tests compare is what the executable received."""
    exe = write_fake_trtllm_build(tmp_path / "bin")
    monkeypatch.setenv("FAKE_TRTLLM_ARGV", str(tmp_path / "argv.json"))
    opts = BuildOptions(command=str(exe), extra_args=tuple(shlex.split("--strip_plan")))
    build_engine(ckpt, tmp_path / "engine", opts, tmp_path / "build.log")
    import json

    assert json.loads((tmp_path / "argv.json").read_text()) == build_command(opts, ckpt, tmp_path / "engine")[1:]
    assert sorted(os.listdir(tmp_path / "engine")) == ["config.json", "rank0.engine", "rank1.engine"]


def test_received_files_never_land_outside_the_destination_through_a_symlinked_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "original").symlink_to(outside, target_is_directory=True)
    staging = make_staging(dest)
    (staging / "original").mkdir(parents=True)
    (staging / "original" / "params.json").write_text("{}")
    data = b"{}"
    files = {"original/params.json": hashlib.sha256(data).hexdigest()}
    with pytest.raises(FilesError, match="neither the source published"):  # the link is no file of ours
        install(staging, dest, "m", files)
    assert not any(outside.iterdir())
    _write_complete(dest, {"original": "0" * 64})  # a link an earlier receive wrote: removed as stale, not followed
    assert install(staging, dest, "m", files) == ["original"]
    assert not any(outside.iterdir()) and (dest / "original" / "params.json").read_text() == "{}"


def _write_complete(dest: Path, files: dict[str, str]) -> None:
    (dest / COMPLETE).write_text(json.dumps({"v": 1, "model": "m", "files": files}))


def _staged(dest: Path, contents: dict[str, bytes]) -> tuple[Path, dict[str, str]]:
    staging = make_staging(dest)
    for rel, data in contents.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    return staging, {rel: hashlib.sha256(data).hexdigest() for rel, data in contents.items()}


def test_a_reused_destination_ends_with_exactly_the_published_files_and_the_marker_last(tmp_path):
    dest = tmp_path / "dest"
    first = {"model.safetensors.index.json": b"{old}", "model-00001.safetensors": b"a", "config.json": b"1"}
    staging, files = _staged(dest, first)
    assert install(staging, dest, "m", files) == []
    assert read_marker(dest) == _files(first)
    second = {"model.safetensors": b"b", "config.json": b"2"}  # no index any more: a stale one would mislead vLLM
    staging, files = _staged(dest, second)
    assert sorted(install(staging, dest, "m", files)) == ["model-00001.safetensors", "model.safetensors.index.json"]
    assert sorted(p.name for p in dest.iterdir()) == sorted([*second, COMPLETE])
    assert (dest / "config.json").read_bytes() == b"2" and read_marker(dest) == files


def _files(contents: dict[str, bytes]) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in contents.items()}


def test_a_destination_holding_files_no_receive_wrote_is_refused_and_left_as_it_is(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    staging, files = _staged(dest, {"config.json": b"1"})
    with pytest.raises(FilesError, match="neither the source published nor an earlier receive wrote"):
        install(staging, dest, "m", files)
    assert (dest / "notes.txt").read_text() == "mine" and not (dest / "config.json").exists()
    assert not (dest / COMPLETE).exists()


def test_an_interrupted_install_is_recognised_and_started_over(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.bin").write_bytes(b"o")
    (dest / "config.json").write_bytes(b"half")  # moved in before the crash; no .mx-complete
    (dest / INSTALLING).write_text(json.dumps({"v": 1, "model": "m", "files": {"old.bin": "x", "config.json": "y"}}))
    staging, files = _staged(dest, {"config.json": b"1", "model.safetensors": b"w"})
    assert install(staging, dest, "m", files) == ["old.bin"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(["config.json", "model.safetensors", COMPLETE])


def test_the_staging_folder_is_created_exclusively_and_never_through_a_planted_link(tmp_path, monkeypatch):
    import runtime_hooks.files.install as inst

    dest = tmp_path / "dest"
    dest.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(inst.secrets, "token_hex", lambda n: "f" * (2 * n))
    planted = dest / f"{STAGING_PREFIX}{os.getpid()}-{'f' * 16}"
    planted.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(FileExistsError):
        make_staging(dest)
    assert planted.is_symlink() and not any(elsewhere.iterdir())
