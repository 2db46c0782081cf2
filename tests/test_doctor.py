"""`mx-sidecar doctor` through real processes: `python -m sidecar doctor` against a real Redis with the ACL of
deploy/make-secrets.sh, real key files and real socket directories. Each case changes one thing from a setup in
which nothing fails, and checks that exactly that check turns to fail, with its fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.lab.embedded_redis import EmbeddedRedis
from tests.tooling import DEPLOY

PASSWORD = "doctor-pw-Vb3kQ9-never-shown"
WRONG = "doctor-wrong-Lm5tR2-never-shown"


def _acl(commands: str) -> str:
    return f"mx on >{PASSWORD} ~mx:* resetchannels {commands}"


def _deploy_commands() -> str:
    """The commands deploy/make-secrets.sh grants the sidecar's Redis user."""
    m = re.search(r"^cmds='([^']+)'", (DEPLOY / "make-secrets.sh").read_text(), re.M)
    assert m, "deploy/make-secrets.sh: no cmds= line"
    return m.group(1)


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[EmbeddedRedis]:
    """A real server whose only usable user is `mx` with the deployment's ACL (the default user has a password
    nobody in the test uses) and a second user lacking two of the commands."""
    lacking = _deploy_commands().replace(" +eval", "").replace(" +scan", "")
    with EmbeddedRedis(password="admin-" + PASSWORD, acl=[_acl(_deploy_commands()),
                                                          _acl(lacking).replace("mx on", "mx-narrow on", 1)]) as r:
        yield r


@pytest.fixture
def setup(tmp_path: Path, acl_redis: EmbeddedRedis) -> dict[str, Any]:
    """A setup in which no check fails: the ACL user's password file, a 0600 key, a private socket directory."""
    pw = tmp_path / "redis-password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    key = tmp_path / "key"
    key.write_text("k" * 64)
    key.chmod(0o600)
    sockets = tmp_path / "mx"
    sockets.mkdir(mode=0o700)
    sockets.chmod(0o700)
    env = {"MX_REDIS_URL": acl_redis.url, "MX_REDIS_USERNAME": "mx", "MX_REDIS_PASSWORD_FILE": str(pw),
           "MX_AUTH_KEY_FILE": str(key), "MX_ZMQ_ADDRESS": f"ipc://{sockets}/engine.sock"}
    return {"env": env, "pw": pw, "key": key, "sockets": sockets}


def _doctor(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MX_", "UCX_"))}
    res = subprocess.run([sys.executable, "-m", "sidecar", "doctor", *args], capture_output=True, text=True,
                         timeout=120, env={**base, **env, "MX_LOG_LEVEL": "warning"})
    return res.returncode, res.stdout, res.stderr


def _checks(env: dict[str, str], *args: str) -> tuple[int, dict[str, dict[str, str]]]:
    rc, out, err = _doctor(env, "--json", *args)
    lines = [json.loads(line) for line in out.splitlines()]
    checks = {c["name"]: c for c in lines}
    assert len(checks) == len(lines) and set(checks) == {"redis", "auth-key", "socket-dir", "shm", "ucx", "rdma",
                                                         "gpu"}, (out, err)
    for c in lines:
        assert set(c) == {"name", "status", "detail", "fix"} and c["status"] in ("ok", "warn", "fail"), c
        assert c["status"] == "ok" or c["fix"] or c["name"] == "socket-dir", f"{c['name']}: a problem without a fix"
    return rc, checks


def _fails(checks: dict[str, dict[str, str]]) -> set[str]:
    return {n for n, c in checks.items() if c["status"] == "fail"}


def test_doctor_passes_with_an_acl_redis_a_private_key_and_a_private_socket_directory(setup):
    rc, checks = _checks(setup["env"])
    assert _fails(checks) == set() and rc == 0, checks
    assert checks["redis"]["status"] == checks["auth-key"]["status"] == checks["socket-dir"]["status"] == "ok"
    assert "authenticated as mx" in checks["redis"]["detail"]
    assert "0600" in checks["auth-key"]["detail"] and "0700" in checks["socket-dir"]["detail"]


def test_doctor_reports_a_wrong_redis_password_as_a_fail_with_its_fix(setup):
    setup["pw"].write_text(WRONG + "\n")
    rc, checks = _checks(setup["env"])
    assert rc == 1 and _fails(checks) == {"redis"}, checks
    assert "authentication failed" in checks["redis"]["detail"]
    assert "MX_REDIS_PASSWORD_FILE" in checks["redis"]["fix"] and "mx-redis-auth" in checks["redis"]["fix"]
    rc, out, err = _doctor(setup["env"])
    assert WRONG not in out + err and PASSWORD not in out + err


def test_doctor_names_the_commands_the_redis_acl_refuses(setup):
    rc, checks = _checks({**setup["env"], "MX_REDIS_USERNAME": "mx-narrow"})
    assert rc == 1 and _fails(checks) == {"redis"}, checks
    assert "refuses eval scan" in checks["redis"]["detail"]
    assert "+eval +scan" in checks["redis"]["fix"]


def test_doctor_reports_an_unreachable_redis_as_a_fail(setup, tmp_path):
    rc, checks = _checks({**setup["env"], "MX_REDIS_URL": f"unix://{tmp_path}/no-redis.sock"})
    assert rc == 1 and _fails(checks) == {"redis"}
    assert "unreachable" in checks["redis"]["detail"] and "MX_REDIS_URL" in checks["redis"]["fix"]


def test_doctor_reports_a_key_file_others_can_read_as_a_fail(setup):
    setup["key"].chmod(0o644)
    rc, checks = _checks(setup["env"])
    assert rc == 1 and _fails(checks) == {"auth-key"}, checks
    assert "mode 0644" in checks["auth-key"]["detail"]  # the daemon's own refusal (Keyring.from_file)
    assert "defaultMode: 288" in checks["auth-key"]["fix"]


def test_doctor_accepts_a_key_file_shaped_like_the_deployments_secret_volume(setup):
    setup["key"].chmod(0o440)  # defaultMode: 288
    rc, checks = _checks(setup["env"])
    assert rc == 0 and checks["auth-key"]["status"] == "ok", checks


def test_doctor_reports_a_missing_socket_directory_as_a_fail(setup, tmp_path):
    env = {**setup["env"], "MX_ZMQ_ADDRESS": f"ipc://{tmp_path}/not-mounted/hook/engine.sock"}
    rc, checks = _checks(env)
    assert rc == 1 and _fails(checks) == {"socket-dir"}, checks
    assert "not-mounted" in checks["socket-dir"]["detail"] and "emptyDir" in checks["socket-dir"]["fix"]


def test_doctor_warns_only_when_the_socket_directory_is_for_the_hook_to_create(setup):
    env = {**setup["env"], "MX_ZMQ_ADDRESS": f"ipc://{setup['sockets']}/hook/engine.sock"}
    rc, checks = _checks(env)
    assert rc == 0 and checks["socket-dir"]["status"] == "warn" and "creates it 0700" in checks["socket-dir"]["detail"]
    assert not (setup["sockets"] / "hook").exists(), "doctor must not create it"


def test_doctor_reports_a_world_writable_socket_directory_as_a_fail(setup):
    setup["sockets"].chmod(0o777)
    rc, checks = _checks(setup["env"])
    assert rc == 1 and _fails(checks) == {"socket-dir"} and "world-writable" in checks["socket-dir"]["detail"]


def test_doctor_prints_one_line_per_check_and_warns_when_dev_shm_is_smaller_than_the_model(setup):
    rc, out, _ = _doctor(setup["env"], "--model-bytes", str(1 << 50))
    assert rc == 0, out
    lines = out.splitlines()
    assert len(lines) == 7 and all(re.match(r"(ok  |warn|fail)  [a-z-]+  \S", ln) for ln in lines), out
    shm = next(ln for ln in lines if ln.split()[1] == "shm")
    assert shm.startswith("warn") and "smaller than the model" in shm and "(fix: " in shm


def test_doctor_probes_exactly_the_commands_the_deployments_acl_grants():
    from sidecar.doctor import REDIS_COMMANDS

    granted = {c.removeprefix("+") for c in _deploy_commands().split() if c.startswith("+")}
    assert set(REDIS_COMMANDS) == granted


def test_mx_sidecar_version_prints_the_installed_distributions_version():
    from importlib.metadata import version

    res = subprocess.run([sys.executable, "-m", "sidecar", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"mx-sidecar {version('mx-sidecar')}", res
