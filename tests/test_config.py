"""Tests of the agent configuration: profiles, sources and their order, and error messages."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

from nodeagent.config import (
    PROFILES,
    AgentConfig,
    ConfigError,
    parse_host_port,
    render_example_toml,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load(tmp_path: Path, toml_text: str | None = None, env: dict[str, str] | None = None,
          overrides: dict | None = None) -> AgentConfig:
    path = None
    if toml_text is not None:
        path = tmp_path / "agent.toml"
        path.write_text(toml_text)
    return AgentConfig.load(path, env=env or {}, overrides=overrides or {},
                            use_default_path=False)


def test_config_defaults_are_lan_profile() -> None:
    config = AgentConfig.with_profile("lan")
    assert config == AgentConfig()
    assert config.profile == "lan"
    assert config.timing.heartbeat_interval_s == 0.5
    assert config.timing.lease_s == 1.0
    assert config.network.bind_host == "127.0.0.1"
    assert config.network.peer_port == 0
    assert config.runtime.torch_threads == 1
    assert config.admin.require_token is None


def test_config_test_profile_short_timings() -> None:
    config = AgentConfig.with_profile("test")
    assert config.profile == "test"
    for name, value in PROFILES["test"]["timing"].items():
        assert getattr(config.timing, name) == value, name
    assert config.timing.heartbeat_interval_s == 0.1
    assert config.timing.dead_after_s <= 1.0
    assert config.network.mdns_enabled is False
    assert config.network.mdns_interfaces == ("127.0.0.1",)


def test_config_wan_profile_is_slower_than_lan() -> None:
    lan = AgentConfig.with_profile("lan").timing
    wan = AgentConfig.with_profile("wan").timing
    assert wan.heartbeat_interval_s > lan.heartbeat_interval_s
    assert wan.dead_after_s > lan.dead_after_s
    assert wan.election_timeout_min_s > lan.election_timeout_min_s


def test_config_with_profile_overrides(tmp_path: Path) -> None:
    config = AgentConfig.with_profile("test", {"data_dir": tmp_path,
                                               "network.static_peers": ["127.0.0.1:7000"]})
    assert config.data_dir == tmp_path
    assert config.network.static_peers == ("127.0.0.1:7000",)
    assert config.timing.heartbeat_interval_s == 0.1


def test_config_toml_applies_over_profile(tmp_path: Path) -> None:
    config = _load(tmp_path, """
profile = "wan"
cluster_name = "lab"
[timing]
heartbeat_interval_s = 2.0
[network]
static_peers = ["10.0.0.2:7470", "[fd00::3]:7470"]
mdns_interfaces = ["eth0"]
[admin]
require_token = true
""")
    assert config.profile == "wan"
    assert config.cluster_name == "lab"
    assert config.timing.heartbeat_interval_s == 2.0
    # Values the file does not set come from the wan profile, not from the lan defaults.
    assert config.timing.dead_after_s == PROFILES["wan"]["timing"]["dead_after_s"]
    assert config.network.static_peers == ("10.0.0.2:7470", "[fd00::3]:7470")
    assert config.network.mdns_interfaces == ("eth0",)
    assert config.admin.require_token is True


def test_config_env_overrides_toml(tmp_path: Path) -> None:
    env = {
        "SHARDMESH_TIMING_HEARTBEAT_INTERVAL_S": "0.25",
        "SHARDMESH_NETWORK_MDNS_ENABLED": "off",
        "SHARDMESH_NETWORK_STATIC_PEERS": "127.0.0.1:1, 127.0.0.2:2",
        "SHARDMESH_ELECTION_STATIC_COORDINATOR": "node-a",
        "SHARDMESH_DATA_DIR": str(tmp_path / "state"),
        "SHARDMESH_LIMITS_MAX_TENSOR_BYTES": "0x100000",
        "SHARDMESH_CONFIG": "/ignored/by/the/loader",
        "UNRELATED": "x",
    }
    config = _load(tmp_path, "[timing]\nheartbeat_interval_s = 0.3\n", env=env)
    assert config.timing.heartbeat_interval_s == 0.25
    assert config.network.mdns_enabled is False
    assert config.network.static_peers == ("127.0.0.1:1", "127.0.0.2:2")
    assert config.election.static_coordinator == "node-a"
    assert config.data_dir == tmp_path / "state"
    assert config.limits.max_tensor_bytes == 1024 * 1024


def test_config_env_selects_profile(tmp_path: Path) -> None:
    config = _load(tmp_path, 'profile = "wan"\n', env={"SHARDMESH_PROFILE": "test"})
    assert config.profile == "test"
    assert config.timing.heartbeat_interval_s == 0.1


def test_config_overrides_beat_env(tmp_path: Path) -> None:
    env = {"SHARDMESH_TIMING_HEARTBEAT_INTERVAL_S": "0.25", "SHARDMESH_RUNTIME_QUEUE_MAX": "5"}
    config = _load(tmp_path, env=env, overrides={
        "timing.heartbeat_interval_s": 0.2,
        "runtime": {"queue_max": "7", "devices": ["cpu"]},
    })
    assert config.timing.heartbeat_interval_s == 0.2
    assert config.runtime.queue_max == 7
    assert config.runtime.devices == ("cpu",)


def test_config_optional_fields_accept_none_words(tmp_path: Path) -> None:
    config = _load(tmp_path, env={"SHARDMESH_ADMIN_REQUIRE_TOKEN": "none",
                                  "SHARDMESH_NETWORK_ADVERTISE_HOST": ""})
    assert config.admin.require_token is None
    assert config.network.advertise_host is None


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("timing.heartbeat_interval_s", "fast", "expected a number"),
    ("timing.heartbeat_interval_s", 100, "[0.01, 60]"),
    ("timing.heartbeat_interval_s", float("nan"), "[0.01, 60]"),
    ("network.peer_port", 70000, "[0, 65535]"),
    ("network.peer_port", -1, "[0, 65535]"),
    ("network.peer_port", 1.5, "expected an integer"),
    ("network.peer_port", True, "expected an integer"),
    ("network.mdns_enabled", "maybe", "expected a boolean"),
    ("network.static_peers", 5, "expected a list of strings"),
    ("network.static_peers", ["ok:1", 2], "expected a list of strings"),
    ("runtime.torch_threads", 0, "[1, 1024]"),
    ("store.quota_bytes", 10, "out of range"),
    ("log_level", "LOUD", "DEBUG, INFO, WARNING, ERROR"),
    ("data_dir", "", "non-empty path"),
    ("cluster_name", 3, "expected a string"),
])
def test_config_error_names_key_and_range(tmp_path: Path, key: str, value: object,
                                          expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, overrides={key: value})
    message = str(caught.value)
    assert repr(key) in message
    assert expected in message
    assert caught.value.key == key
    assert "(from override)" in message


def test_config_env_error_names_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, env={"SHARDMESH_RUNTIME_BATCH_MAX_SIZE": "lots"})
    assert "runtime.batch_max_size" in str(caught.value)
    assert "SHARDMESH_RUNTIME_BATCH_MAX_SIZE" in str(caught.value)
    assert "'lots'" in str(caught.value)


def test_config_toml_error_names_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, "[timing]\nlease_s = -1\n")
    assert "timing.lease_s" in str(caught.value)
    assert str(tmp_path / "agent.toml") in str(caught.value)


def test_config_unknown_key_suggests_close_match(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, "[timing]\nhearbeat_interval_s = 1.0\n")
    assert "'timing.hearbeat_interval_s' is unknown" in str(caught.value)
    assert "did you mean 'timing.heartbeat_interval_s'" in str(caught.value)


def test_config_unknown_env_field_is_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, env={"SHARDMESH_TIMING_HEARTBEAT_S": "1"})
    assert "timing.heartbeat_s" in str(caught.value)


def test_config_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, 'profile = "moon"\n')
    assert "'moon'" in str(caught.value)
    assert "lan, wan, test" in str(caught.value)


@pytest.mark.parametrize(("overrides", "key", "fragment"), [
    ({"timing.election_timeout_min_s": 3.0, "timing.election_timeout_max_s": 3.0},
     "timing.election_timeout_min_s", "below timing.election_timeout_max_s (3.0)"),
    ({"timing.lease_s": 1.5}, "timing.lease_s", "below timing.election_timeout_min_s (1.5)"),
    ({"timing.heartbeat_interval_s": 2.0}, "timing.heartbeat_interval_s",
     "below timing.suspect_after_s (2.0)"),
    ({"timing.heartbeat_interval_s": 1.8, "timing.suspect_after_s": 4.0},
     "timing.heartbeat_interval_s", "below timing.election_timeout_min_s (1.5)"),
    ({"timing.suspect_after_s": 6.0}, "timing.suspect_after_s", "below timing.dead_after_s"),
    ({"timing.indirect_probe_timeout_s": 5.0}, "timing.indirect_probe_timeout_s",
     "below timing.dead_after_s"),
    ({"timing.reconnect_backoff_min_s": 20.0}, "timing.reconnect_backoff_min_s",
     "must not exceed timing.reconnect_backoff_max_s"),
    ({"election.voter": False, "election.witness": True}, "election.witness",
     "requires election.voter = true"),
])
def test_config_cross_field_rules(tmp_path: Path, overrides: dict, key: str,
                                  fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, overrides=overrides)
    assert caught.value.key == key
    assert fragment in str(caught.value)


@pytest.mark.parametrize("entry", ["nohost", "host:", ":80", "host:0", "host:65536", "::1:80",
                                   "[::1]80", "host:http"])
def test_config_static_peer_invalid(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, overrides={"network.static_peers": [entry]})
    assert repr(entry) in str(caught.value)
    assert caught.value.key == "network.static_peers"


def test_config_parse_host_port_forms() -> None:
    assert parse_host_port("10.0.0.1:7470") == ("10.0.0.1", 7470)
    assert parse_host_port("[fd00::1]:7470") == ("fd00::1", 7470)
    assert parse_host_port("node-b.lan:1") == ("node-b.lan", 1)


def test_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        AgentConfig.load(missing, env={})
    assert str(missing) in str(caught.value)
    assert "not found" in str(caught.value)


def test_config_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, "[timing\nlease_s = 1\n")
    assert "not valid TOML" in str(caught.value)


def test_config_is_frozen() -> None:
    config = AgentConfig.with_profile("test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timing.lease_s = 5.0  # type: ignore[misc]
    hash(config)


def test_config_replace_validates(tmp_path: Path) -> None:
    config = AgentConfig.with_profile("test", {"data_dir": tmp_path})
    changed = config.replace({"network.peer_port": 7470})
    assert changed.network.peer_port == 7470
    assert changed.data_dir == tmp_path
    assert config.network.peer_port == 0
    with pytest.raises(ConfigError):
        config.replace({"timing.lease_s": 10.0})


def test_config_to_dict_round_trips(tmp_path: Path) -> None:
    config = AgentConfig.with_profile("wan", {"data_dir": tmp_path, "tls_dir": tmp_path / "t",
                                              "network.static_peers": ["h:1"]})
    data = json.loads(json.dumps(config.to_dict()))
    assert data["timing"]["heartbeat_interval_s"] == 1.0
    assert data["network"]["static_peers"] == ["h:1"]
    assert data["data_dir"] == str(tmp_path)
    assert AgentConfig.load(None, env={}, overrides=data, use_default_path=False) == config


def test_config_effective_tls_dir(tmp_path: Path) -> None:
    assert AgentConfig.with_profile("test", {"data_dir": tmp_path}).effective_tls_dir == \
        tmp_path / "tls"
    creds = tmp_path / "creds"
    assert AgentConfig.with_profile("test", {"tls_dir": creds}).effective_tls_dir == creds


def test_config_every_field_documented() -> None:
    docs = AgentConfig.documentation()
    assert len(docs) >= 40
    for doc in docs:
        assert len(doc.doc) > 20, doc.key
    keys = {doc.key for doc in docs}
    for required in ("network.bind_host", "timing.heartbeat_interval_s", "election.voters",
                     "runtime.devices", "limits.max_tensor_bytes", "store.quota_bytes",
                     "admin.require_token", "data_dir", "cluster_name"):
        assert required in keys


def test_config_duration_fields_carry_units() -> None:
    for doc in AgentConfig.documentation():
        if doc.key.startswith("timing."):
            assert doc.key.endswith("_s"), doc.key


def test_config_example_file_is_current() -> None:
    example = (REPO_ROOT / "systemd" / "agent.toml.example").read_text()
    assert example == render_example_toml(), \
        "regenerate systemd/agent.toml.example from nodeagent.config.render_example_toml()"


def test_config_example_uncommented_loads_defaults(tmp_path: Path) -> None:
    lines = []
    previous = ""
    for line in render_example_toml().splitlines():
        # Uncomment each "# key = value" line, which follows the "# (type: ...)" line; keys
        # unset by default have no TOML form and stay commented.
        if previous.startswith("# (type:") and not line.endswith("= none"):
            assert re.match(r"# [a-z_]+ = ", line), line
            lines.append(line[2:])
        elif not line.startswith("#"):
            lines.append(line)
        previous = line
    text = "\n".join(lines)
    tomllib.loads(text)
    assert _load(tmp_path, text) == AgentConfig()
