"""The checkpoint revision in a replica's identity: local directories by content (with a per-file digest cache),
hub ids by commit, MX_MODEL_REVISION above both."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from runtime_hooks import identity
from runtime_hooks.identity import CACHE_FILE, checkpoint_revision, local_checkpoint_digest

HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MX_MODEL_REVISION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _age(path: Path) -> None:
    """Files written just now are not cached (their mtime could still hide a write); a real checkpoint is older."""
    for p in [path, *path.rglob("*")]:
        if p.is_file() and not p.is_symlink():
            os.utime(p, ns=(HOUR_AGO_NS, HOUR_AGO_NS))


def _checkpoint(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / "model-00001-of-00002.safetensors").write_bytes(bytes(range(256)) * 64)
    (root / "model-00002-of-00002.safetensors").write_bytes(b"\x01" * 5000)
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    _age(root)
    return root


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    _age(path.parent)


def test_changing_one_byte_of_a_weight_file_gives_a_new_identity(tmp_path):
    ckpt = _checkpoint(tmp_path / "m")
    before = checkpoint_revision(str(ckpt), None)
    _flip_one_byte(ckpt / "model-00001-of-00002.safetensors")  # same size, same name, same header region
    after = checkpoint_revision(str(ckpt), None)
    assert before.startswith("local-") and after.startswith("local-") and before != after
    assert len(before) == len("local-") + 16


def test_a_changed_file_in_a_subdirectory_or_a_new_file_gives_a_new_identity(tmp_path):
    ckpt = _checkpoint(tmp_path / "m")
    base = local_checkpoint_digest(ckpt).digest
    (ckpt / "tokenizer" / "vocab.txt").write_text("a\nc\n")
    changed = local_checkpoint_digest(ckpt).digest
    (ckpt / "extra.bin").write_bytes(b"x")
    added = local_checkpoint_digest(ckpt).digest
    assert len({base, changed, added}) == 3


def test_the_same_content_elsewhere_has_the_same_identity(tmp_path):
    assert local_checkpoint_digest(_checkpoint(tmp_path / "a")).digest == \
        local_checkpoint_digest(_checkpoint(tmp_path / "b")).digest


def test_a_restart_with_an_unchanged_directory_takes_every_digest_from_the_cache(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path / "m")
    first = local_checkpoint_digest(ckpt)
    assert first.hashed_files == first.files == 4 and first.cache_path == ckpt / CACHE_FILE
    with caplog.at_level("INFO", logger="mx.identity"):
        second = local_checkpoint_digest(ckpt)
    assert second.digest == first.digest
    assert (second.hashed_files, second.hashed_bytes, second.cached_files) == (0, 0, 4)
    assert second.cached_bytes == sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()
                                      and not p.name.startswith("."))
    assert any("hashed 0 (0 bytes), from cache 4" in r.getMessage() for r in caplog.records)


def test_a_touched_but_identical_file_is_rehashed_and_gives_the_same_identity(tmp_path):
    ckpt = _checkpoint(tmp_path / "m")
    first = local_checkpoint_digest(ckpt)
    weights = ckpt / "model-00002-of-00002.safetensors"
    os.utime(weights, ns=(HOUR_AGO_NS + 10**9, HOUR_AGO_NS + 10**9))
    second = local_checkpoint_digest(ckpt)
    assert second.digest == first.digest
    assert (second.hashed_files, second.hashed_bytes) == (1, weights.stat().st_size)
    assert local_checkpoint_digest(ckpt).hashed_files == 0


def test_a_file_written_just_now_is_hashed_again_at_the_next_start(tmp_path):
    ckpt = _checkpoint(tmp_path / "m")
    (ckpt / "config.json").write_text('{"hidden_size": 9}')  # mtime now: a second write could hide in its tick
    local_checkpoint_digest(ckpt)
    assert local_checkpoint_digest(ckpt).hashed_files == 1


def test_a_read_only_checkpoint_directory_puts_the_cache_under_xdg_cache_home(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "m")
    ckpt.chmod(0o555)
    if os.geteuid() == 0:  # root writes through mode bits
        monkeypatch.setattr(identity, "_writable", lambda d: False)
    try:
        first = local_checkpoint_digest(ckpt)
        second = local_checkpoint_digest(ckpt)
    finally:
        ckpt.chmod(0o755)
    assert not (ckpt / CACHE_FILE).exists()
    assert first.cache_path is not None
    assert first.cache_path.parent == tmp_path / "xdg" / "mx-sidecar" / "checkpoint-digests"
    assert json.loads(first.cache_path.read_text())["v"] == 1
    assert second.hashed_files == 0 and second.digest == first.digest


@pytest.mark.parametrize("garbage", [b"{not json", b"[1, 2]", b'{"v": 999, "files": {}}',
                                     b'{"v": 1, "files": {"config.json": {"size": 1}}}'])
def test_a_malformed_cache_file_is_ignored_and_rewritten(tmp_path, garbage):
    ckpt = _checkpoint(tmp_path / "m")
    expected = local_checkpoint_digest(ckpt).digest
    (ckpt / CACHE_FILE).write_bytes(garbage)
    again = local_checkpoint_digest(ckpt)
    assert again.digest == expected and again.hashed_files == 4
    assert json.loads((ckpt / CACHE_FILE).read_text())["v"] == 1
    assert local_checkpoint_digest(ckpt).hashed_files == 0


def test_a_cache_entry_whose_key_does_not_match_is_not_trusted(tmp_path):
    ckpt = _checkpoint(tmp_path / "m")
    local_checkpoint_digest(ckpt)
    cache = json.loads((ckpt / CACHE_FILE).read_text())
    cache["files"]["tokenizer/vocab.txt"]["size"] += 1
    cache["files"]["config.json"]["mtime_ns"] = str(cache["files"]["config.json"]["mtime_ns"])  # not an int
    (ckpt / CACHE_FILE).write_text(json.dumps(cache))
    assert local_checkpoint_digest(ckpt).hashed_files == 2


def test_a_symlink_planted_at_the_cache_path_is_not_followed(tmp_path):
    ckpt = _checkpoint(tmp_path / "m")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (ckpt / CACHE_FILE).symlink_to(victim)
    result = local_checkpoint_digest(ckpt)
    assert victim.read_text() == "keep me"
    assert not (ckpt / CACHE_FILE).is_symlink() and json.loads((ckpt / CACHE_FILE).read_text())["v"] == 1
    assert result.hashed_files == 4


def test_a_symlink_planted_at_the_cache_temp_path_is_not_followed(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "m")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    monkeypatch.setattr(identity.secrets, "token_hex", lambda n=None: "feedface")
    (ckpt / f"{CACHE_FILE}.feedface.tmp").symlink_to(victim)
    result = local_checkpoint_digest(ckpt)
    assert victim.read_text() == "keep me"
    assert result.cache_path is None and not (ckpt / CACHE_FILE).exists()
    assert result.digest == local_checkpoint_digest(_checkpoint(tmp_path / "clean")).digest


def test_hidden_files_and_directories_are_ignored(tmp_path):
    ckpt = _checkpoint(tmp_path / "m")
    base = local_checkpoint_digest(ckpt).digest
    (ckpt / ".hidden").write_text("x")
    (ckpt / ".cache" / "huggingface").mkdir(parents=True)
    (ckpt / ".cache" / "huggingface" / "download.lock").write_text("y")
    (ckpt / "tokenizer" / ".DS_Store").write_text("z")
    assert local_checkpoint_digest(ckpt).digest == base


def test_symlinked_files_are_read_through_as_in_a_hugging_face_snapshot(tmp_path):
    plain = _checkpoint(tmp_path / "plain")
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("a" * 40)
    (snap / "tokenizer").mkdir(parents=True)
    for f in [p for p in plain.rglob("*") if p.is_file() and not p.name.startswith(".")]:
        rel = f.relative_to(plain)
        blob = repo / "blobs" / rel.as_posix().replace("/", "_")
        blob.write_bytes(f.read_bytes())
        (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    _age(repo)
    first = local_checkpoint_digest(snap)
    assert first.digest == local_checkpoint_digest(plain).digest
    blob = repo / "blobs" / "model-00002-of-00002.safetensors"
    blob.write_bytes(b"\x02" * 5000)  # the target changes: its stat is the key, so it is hashed again
    second = local_checkpoint_digest(snap)
    assert second.hashed_files == 1 and second.digest != first.digest


def test_mx_model_revision_overrides_everything(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "m")
    monkeypatch.setenv("MX_MODEL_REVISION", "release-7")
    monkeypatch.setattr(identity, "local_checkpoint_digest", lambda p: pytest.fail("hashed"))
    assert checkpoint_revision(str(ckpt), None) == "release-7"
    assert checkpoint_revision("org/name", "v2") == "release-7"


def test_an_explicit_revision_on_a_local_directory_is_kept_beside_its_content_digest(tmp_path):
    ckpt = _checkpoint(tmp_path / "m")
    plain = checkpoint_revision(str(ckpt), None)
    assert checkpoint_revision(str(ckpt), "v2") == plain + "@v2"


def test_an_unreadable_file_makes_the_replica_match_no_other(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "m")

    def fail(f: object) -> tuple[str, bool]:
        raise PermissionError("denied")

    monkeypatch.setattr(identity, "_hash_file", fail)
    a, b = checkpoint_revision(str(ckpt), None), checkpoint_revision(str(ckpt), None)
    assert a.startswith("unresolved-") and b.startswith("unresolved-") and a != b


def test_a_hub_commit_revision_is_used_as_is():
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert checkpoint_revision("org/name", commit) == "hub-" + commit


def test_a_hub_id_resolves_offline_from_the_hugging_face_cache(tmp_path, monkeypatch):
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    refs = tmp_path / "hub" / "models--org--name" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    (refs / "v1").write_text("f" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert checkpoint_revision("org/name", None) == "hub-" + commit
    assert checkpoint_revision("org/name", "v1") == "hub-" + "f" * 40


def test_a_hub_id_that_cannot_be_resolved_matches_no_other_replica(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:
        pass
    else:
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    a, b = checkpoint_revision("org/name", None), checkpoint_revision("org/name", None)
    assert a.startswith("unresolved-") and b.startswith("unresolved-") and a != b
    assert checkpoint_revision("/no/such/dir", None).startswith("unresolved-")
