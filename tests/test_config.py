import math

import pytest

from sidecar.config import SETTINGS, Config, ConfigError, markdown_table, rank_address


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
