import math

import pytest

from sidecar.config import Config, rank_address
from sidecar.settings import SETTINGS, ConfigError, markdown_table


def test_defaults_parse_and_every_setting_is_in_the_readme():
    Config.from_env({})
    with open("README.md") as f:
        readme = f.read()
    missing = [s.env for s in SETTINGS if s.env not in readme]
    assert not missing, f"README lacks {missing}"
    assert all(s.env in markdown_table() for s in SETTINGS)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_timeouts_of_zero_nan_or_garbage_are_rejected(value):
    with pytest.raises(ConfigError, match="MX_TRANSFER_TIMEOUT"):
        Config.from_env({"MX_TRANSFER_TIMEOUT": value})


@pytest.mark.parametrize("env", [{"MX_VERIFY": "size"}, {"MX_SOURCE_MODE": "fast"}, {"MX_STAGING_SLOT_BYTES": "0"},
                                 {"MX_METRICS_PORT": "70000"}, {"MX_REDIS_URL": "http://x"},
                                 {"MX_ZMQ_ADDRESS": "/tmp/x.sock"}])
def test_nonsense_values_are_rejected(env):
    with pytest.raises(ConfigError):
        Config.from_env(env)


def test_a_source_ttl_shorter_than_two_heartbeats_is_rejected():
    with pytest.raises(ConfigError, match="MX_SOURCE_TTL"):
        Config.from_env({"MX_HEARTBEAT_INTERVAL": "5", "MX_SOURCE_TTL": "6"})


def test_sizes_accept_units():
    assert Config.from_env({"MX_STAGING_SLOT_BYTES": "256MiB"}).staging_slot_bytes == 256 << 20
    assert Config.from_env({"MX_STAGING_SLOT_BYTES": "1GiB"}).staging_slot_bytes == 1 << 30
    assert math.isfinite(Config.from_env({}).transfer_timeout)


def test_rank_is_appended_to_the_socket_name():
    assert rank_address("ipc:///tmp/mx/vllm.sock", 0) == "ipc:///tmp/mx/vllm-0.sock"
    assert rank_address("ipc:///tmp/mx/vllm.sock", 3) == "ipc:///tmp/mx/vllm-3.sock"
    assert rank_address("ipc:///tmp/mx/engine", 1) == "ipc:///tmp/mx/engine-1"
    assert rank_address("tcp://127.0.0.1:5550", 2) == "tcp://127.0.0.1:5552"


def test_the_readme_table_is_the_generated_one():
    with open("README.md") as f:
        assert markdown_table() in f.read(), "README's settings table is stale: paste `mx-sidecar config --markdown`"


def test_settings_is_a_leaf_module_of_the_standard_library():
    import ast
    import sys
    from pathlib import Path

    import sidecar.settings

    tree = ast.parse(Path(sidecar.settings.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported - set(sys.stdlib_module_names)


def test_every_mx_variable_is_read_through_the_registry():
    import re
    from pathlib import Path

    reads = re.compile(r"(environ(\.get)?\s*[\[(]|getenv\()\s*['\"](MX_\w+)")
    offenders = [f"{p}: {m.group(3)}" for root in ("sidecar", "runtime_hooks") for p in Path(root).rglob("*.py")
                 if p.name != "settings.py" for m in reads.finditer(p.read_text())]
    assert not offenders, offenders


def test_one_setting_reads_through_the_registry():
    from sidecar import settings

    assert settings.get("MX_STAGING_SLOTS", {"MX_STAGING_SLOTS": "8"}) == 8
    assert settings.get("MX_REDIS_URL", {}, default=None) is None
    with pytest.raises(ConfigError, match="MX_STAGING_SLOTS"):
        settings.get("MX_STAGING_SLOTS", {"MX_STAGING_SLOTS": "0"})
    assert {s.env for s in SETTINGS} == set(settings.BY_ENV)
