"""One configuration object for the node agent, with named timing profiles.

Problem: timings, ports, limits and paths are read by every component. Reading them from module
constants or from the environment at import time forces tests to patch globals, and a typo in a
config file would otherwise be ignored silently.

Rule chosen: `AgentConfig` is a tree of frozen dataclasses, built once at startup and passed down.
Each field declares its default, its unit (in its name: `_s`, `_ms`, `_bytes`), its accepted range
and a one-line description in the field metadata. Validation and `documentation()` both read that
metadata, so a field cannot be documented with one range and checked against another.

Sources are applied in this order, each overriding the previous one:
1. the field defaults, which are the `lan` profile;
2. the selected profile (`lan`, `wan` or `test`), chosen by the `profile` key of the overrides,
   else `SHARDMESH_PROFILE`, else the top-level `profile` key of the TOML file, else `lan`;
3. the TOML file (`/etc/shardmesh/agent.toml` when no path is given and that file exists);
4. environment variables `SHARDMESH_<SECTION>_<FIELD>` (top-level fields: `SHARDMESH_<FIELD>`);
5. explicit overrides (command-line flags), as `{"section.field": value}` or nested dicts.

Unknown keys are errors, not warnings: a misspelled `hearbeat_interval_s` that silently kept the
default is a worse failure than a refusal to start. Every error is a `ConfigError` that names the
key, the value, where it came from and the accepted range or type.

Lists are stored as tuples so that the whole object stays immutable and hashable.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "AgentConfig", "AdminConfig", "ConfigError", "ElectionConfig", "FieldDoc", "LimitsConfig",
    "NetworkConfig", "PROFILES", "RuntimeConfig", "StoreConfig", "TimingConfig",
    "DEFAULT_CONFIG_PATH", "parse_host_port", "render_example_toml",
]

DEFAULT_CONFIG_PATH = Path("/etc/shardmesh/agent.toml")
ENV_PREFIX = "SHARDMESH_"

MiB = 1024 * 1024
GiB = 1024 * MiB


class ConfigError(ValueError):
    """An invalid, unknown or missing configuration value.

    `key` is the dotted key (`timing.heartbeat_interval_s`), `value` the rejected value, `source`
    where it came from (a file path, an environment variable name, `override` or `profile`).
    """

    def __init__(self, message: str, *, key: str | None = None, value: Any = None,
                 source: str | None = None) -> None:
        self.key = key
        self.value = value
        self.source = source
        parts = [message]
        if source is not None:
            parts.append(f"(from {source})")
        super().__init__(" ".join(parts))


def _field(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
           min_open: bool = False, choices: tuple[Any, ...] | None = None) -> Any:
    """Declare a config field with its description and accepted range in one place.

    `min_open=True` makes the lower bound exclusive (a duration that must be above zero).
    """
    metadata = {"doc": doc, "min": min, "max": max, "min_open": min_open, "choices": choices}
    if isinstance(default, (list, tuple)):
        items = tuple(default)
        return field(default_factory=lambda: items, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class NetworkConfig:
    """Listening addresses, discovery and static peers."""

    bind_host: str = _field(
        "127.0.0.1", "Address the peer (mutual-TLS) listener binds to. Use 0.0.0.0 or a LAN "
        "address for a real cluster; the loopback default keeps a fresh install private.")
    peer_port: int = _field(
        0, "TCP port of the peer listener; 0 picks a free port (tests and the demo).",
        min=0, max=65535)
    admin_host: str = _field(
        "127.0.0.1", "Address the admin and inference HTTP endpoint binds to. A non-loopback "
        "address turns on token authentication unless admin.require_token says otherwise.")
    admin_port: int = _field(
        0, "TCP port of the admin HTTP endpoint; 0 picks a free port.", min=0, max=65535)
    mdns_enabled: bool = _field(
        True, "Announce this agent and browse for peers with mDNS (_shardmesh._tcp.local.).")
    mdns_interfaces: tuple[str, ...] = _field(
        (), "Interface names or IPv4 addresses mDNS binds to. Empty picks the interfaces that are "
        "up, multicast capable and not virtual or loopback; tests pass 127.0.0.1.")
    static_peers: tuple[str, ...] = _field(
        (), "Peers given as host:port ([v6addr]:port for IPv6), contacted without multicast. "
        "Needed where multicast is blocked.")
    advertise_host: str | None = _field(
        None, "Address other agents should dial, announced in mDNS and in the peer handshake. "
        "None uses the address of the interface mDNS announced on, else bind_host.")


@dataclass(frozen=True)
class TimingConfig:
    """Heartbeats, failure detection, election and transport timeouts, in seconds.

    Shorter failure-detection timings detect a dead agent sooner but declare a slow agent dead
    more often. The `wan` profile trades detection speed for tolerance of jitter.
    """

    heartbeat_interval_s: float = _field(
        0.5, "Interval between heartbeats to each member. Lower detects failures sooner and "
        "costs one small frame per member per interval.", min=0.01, max=60.0)
    suspect_after_s: float = _field(
        2.0, "Silence after which a member is suspected and indirect probes start (four "
        "missed heartbeats at the default interval).", min=0.02, max=600.0)
    dead_after_s: float = _field(
        5.0, "Silence after which a suspected member is declared dead, provided an indirect "
        "probe through another member also failed.", min=0.05, max=3600.0)
    indirect_probe_timeout_s: float = _field(
        1.0, "Time allowed for another member to confirm that it cannot reach a suspect.",
        min=0.01, max=600.0)
    link_probe_interval_s: float = _field(
        60.0, "Interval between bandwidth probes (2 MiB on the data plane) to each member. The "
        "planner uses the fastest of the last four, so one probe slowed by other work does not "
        "steer it. 0 probes once per connection only.", min=0.0, max=86400.0)
    election_timeout_min_s: float = _field(
        1.5, "Lower bound of the randomized election timeout: a voter that hears no coordinator "
        "for this long starts a pre-vote.", min=0.05, max=600.0)
    election_timeout_max_s: float = _field(
        3.0, "Upper bound of the randomized election timeout. A wider range makes split votes "
        "rarer and failover slower.", min=0.05, max=1200.0)
    lease_s: float = _field(
        1.0, "Coordinator lease: how long a coordinator acts without hearing from a majority. "
        "Must stay below election_timeout_min_s so that a deposed coordinator stops before a new "
        "one can be elected.", min=0.01, max=600.0)
    handshake_timeout_s: float = _field(
        5.0, "Time allowed for a TCP connect plus the TLS and HELLO handshake.",
        min=0.05, max=600.0)
    tcp_user_timeout_s: float = _field(
        10.0, "TCP_USER_TIMEOUT: unacknowledged data older than this closes the connection.",
        min=0.1, max=3600.0)
    hop_timeout_s: float = _field(
        30.0, "Time a sender waits for the acknowledgement of an activation hop before it resends "
        "the hop elsewhere.", min=0.05, max=3600.0)
    drain_timeout_s: float = _field(
        10.0, "On shutdown, time allowed for in-flight requests to finish before links close.",
        min=0.0, max=3600.0)
    reconnect_backoff_min_s: float = _field(
        0.2, "First delay before redialing a peer whose link dropped; doubles on each failure.",
        min=0.001, max=600.0)
    reconnect_backoff_max_s: float = _field(
        10.0, "Cap of the redial delay.", min=0.001, max=3600.0)
    loop_lag_warn_s: float = _field(
        0.25, "Event-loop lag above which a WARNING is logged and this agent widens its own "
        "timeouts instead of accusing peers.", min=0.001, max=60.0)


@dataclass(frozen=True)
class ElectionConfig:
    """Voting rights and coordinator eligibility."""

    voter: bool = _field(
        True, "This agent votes and may become coordinator. Set false on small edge boards.")
    voters: tuple[str, ...] = _field(
        (), "Node ids of the voters, the same list on every agent. Empty is allowed only for a "
        "single agent with mDNS off and no static peers, which then votes for itself alone.")
    witness: bool = _field(
        False, "This agent votes but runs no model segments (a tie-breaker for two-node "
        "clusters). Requires election.voter to be true.")
    static_coordinator: str | None = _field(
        None, "Node id that is always the coordinator, which disables elections. For debugging.")


@dataclass(frozen=True)
class RuntimeConfig:
    """Model execution on this agent."""

    torch_threads: int = _field(
        1, "torch intra-op threads per device worker. Higher speeds up large CPU matrix work but "
        "competes with the event loop for cores.", min=1, max=1024)
    batch_max_size: int = _field(
        8, "Largest micro-batch a segment runner forms from queued requests.", min=1, max=4096)
    # 0 = greedy: an idle worker runs whatever is queued, and requests that arrive while it runs
    # batch up anyway. bench/pipeline.py measured 3-stage MiniLM p50 at 21.5 ms with 0 against
    # 29.0 ms with 2 ms, at the same throughput (2-core x86-64, torch 2.13.0 CPU).
    batch_max_wait_ms: float = _field(
        0.0, "Longest time the first queued request waits for others to join its micro-batch.",
        min=0.0, max=10_000.0)
    queue_max: int = _field(
        256, "Requests queued per segment before new ones are rejected with a retryable error.",
        min=1, max=1_000_000)
    # A segment worker runs Python between torch operations, so while it computes, the event loop
    # waits for the GIL up to one switch interval. Running MiniLM on a worker thread, the p90 delay
    # of a 1 ms timer on the loop was 1.9 ms at Python's default of 5 ms and 0.1 ms at 0.5 ms
    # (2-core x86-64, torch 2.13.0 CPU).
    switch_interval_ms: float = _field(
        0.5, "Python's thread switch interval (sys.setswitchinterval) for this agent process. "
        "Lower keeps the event loop responsive while segment workers compute.", min=0.05, max=100.0)
    devices: tuple[str, ...] = _field(
        (), "torch devices to run segments on (cpu, cuda:0, mps, xpu:0). Empty uses every "
        "device the capability probe found.")


@dataclass(frozen=True)
class LimitsConfig:
    """Size limits checked before anything is allocated."""

    max_tensor_bytes: int = _field(
        256 * MiB, "Largest tensor payload accepted in one frame (256 MiB covers a batch of 8 "
        "x 4096 tokens x 2048 float32 activations).", min=1024, max=64 * GiB)
    max_request_bytes: int = _field(
        64 * MiB, "Largest HTTP request body accepted by the inference endpoint.",
        min=1024, max=64 * GiB)


@dataclass(frozen=True)
class StoreConfig:
    """The content-addressed segment store in the data directory."""

    quota_bytes: int = _field(
        10 * GiB, "Disk space the segment store may use; least recently used segments are "
        "evicted above it.", min=1 * MiB, max=1 << 50)


@dataclass(frozen=True)
class AdminConfig:
    """Authentication of the admin and inference HTTP endpoint."""

    require_token: bool | None = _field(
        None, "Require a bearer token on admin requests. None requires one only when "
        "network.admin_host is not a loopback address.")
    token_file: Path | None = _field(
        None, "File holding the admin and inference tokens (tokens.json). None uses tokens.json "
        "in the data directory.")
    alert_rules_file: Path | None = _field(
        None, "TOML file of alarm rules, one [[rules]] table each with name, metric, threshold, "
        "comparison, window_s and optional labels and message. None means no alarms.")


@dataclass(frozen=True)
class FieldDoc:
    """Description of one configuration key, for help output and the example file."""

    key: str
    type_name: str
    default: Any
    doc: str
    range_text: str


_SECTIONS: dict[str, type] = {
    "network": NetworkConfig,
    "timing": TimingConfig,
    "election": ElectionConfig,
    "runtime": RuntimeConfig,
    "limits": LimitsConfig,
    "store": StoreConfig,
    "admin": AdminConfig,
}

# Field overrides per profile, applied over the defaults. The defaults are the `lan` profile.
# `wan` assumes round trips of up to about 300 ms with jitter. `test` keeps every bound short so
# that failure-detection and election tests finish in about a second on a loaded machine.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "lan": {},
    "wan": {
        "timing": {
            "heartbeat_interval_s": 1.0,
            "suspect_after_s": 5.0,
            "dead_after_s": 15.0,
            "indirect_probe_timeout_s": 3.0,
            "link_probe_interval_s": 300.0,
            "election_timeout_min_s": 5.0,
            "election_timeout_max_s": 10.0,
            "lease_s": 3.0,
            "handshake_timeout_s": 15.0,
            "tcp_user_timeout_s": 30.0,
            "hop_timeout_s": 60.0,
            "drain_timeout_s": 30.0,
            "reconnect_backoff_min_s": 1.0,
            "reconnect_backoff_max_s": 30.0,
            "loop_lag_warn_s": 0.5,
        },
    },
    "test": {
        "timing": {
            "heartbeat_interval_s": 0.1,
            "suspect_after_s": 0.5,
            "dead_after_s": 1.0,
            "indirect_probe_timeout_s": 0.3,
            "election_timeout_min_s": 0.4,
            "election_timeout_max_s": 0.8,
            "lease_s": 0.25,
            "handshake_timeout_s": 3.0,
            "tcp_user_timeout_s": 3.0,
            "hop_timeout_s": 3.0,
            "drain_timeout_s": 2.0,
            "reconnect_backoff_min_s": 0.05,
            "reconnect_backoff_max_s": 0.5,
            "loop_lag_warn_s": 0.2,
        },
        # mDNS stays off unless a test turns it on, and then binds to loopback only, because
        # the automatic interface choice would multicast out of the machine's real interfaces.
        "network": {"mdns_enabled": False, "mdns_interfaces": ("127.0.0.1",)},
        "store": {"quota_bytes": 1 * GiB},
    },
}

_TOP_LEVEL_DOCS: dict[str, str] = {
    "data_dir": "Directory for credentials, election state, the segment store and caches. "
                "systemd's StateDirectory=shardmesh gives /var/lib/shardmesh.",
    "cluster_name": "Human-readable cluster label shown in status output. The cluster identity "
                    "itself is the cluster id in the node certificate.",
    "tls_dir": "Directory with ca.pem, node.pem, node.key and revoked.json. None uses "
               "<data_dir>/tls; under systemd the unit points it at the credentials directory.",
    "log_level": "Logging level name: DEBUG, INFO, WARNING or ERROR.",
}


@dataclass(frozen=True)
class AgentConfig:
    """The complete node agent configuration. Build it with `load` or `with_profile`."""

    data_dir: Path = _field(Path("/var/lib/shardmesh"), _TOP_LEVEL_DOCS["data_dir"])
    cluster_name: str = _field("shardmesh", _TOP_LEVEL_DOCS["cluster_name"])
    tls_dir: Path | None = _field(None, _TOP_LEVEL_DOCS["tls_dir"])
    log_level: str = _field("INFO", _TOP_LEVEL_DOCS["log_level"],
                            choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    profile: str = _field("lan", "Timing profile applied first, under the values of this file, the "
                          "environment and flags: lan, wan or test.", choices=tuple(PROFILES))
    network: NetworkConfig = field(default_factory=NetworkConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    election: ElectionConfig = field(default_factory=ElectionConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)

    def __post_init__(self) -> None:
        _validate(self)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def with_profile(cls, profile: str = "lan",
                     overrides: Mapping[str, Any] | None = None) -> AgentConfig:
        """Build a config from defaults, one profile and optional overrides; no file, no env."""
        return cls.load(path=None, env={}, overrides={**(overrides or {}), "profile": profile},
                        use_default_path=False)

    @classmethod
    def load(cls, path: Path | str | None = None, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None, *,
             use_default_path: bool = True) -> AgentConfig:
        """Load defaults, profile, TOML file, environment and overrides, in that order.

        `path=None` reads `/etc/shardmesh/agent.toml` when it exists and `use_default_path` is
        true; an explicit path that does not exist is an error. `env=None` reads `os.environ`.
        Raises `ConfigError` for any unknown key or invalid value.
        """
        env = os.environ if env is None else env
        flat_overrides = _flatten(overrides or {}, source="override")

        file_values: dict[str, tuple[Any, str]] = {}
        file_path = _resolve_path(path, use_default_path)
        if file_path is not None:
            file_values = _read_toml(file_path)

        env_values = _read_env(env)
        profile_name = _choose_profile(flat_overrides, env_values, file_values)

        values: dict[str, tuple[Any, str]] = {}
        for section, fields in PROFILES[profile_name].items():
            for name, value in fields.items():
                values[f"{section}.{name}"] = (value, f"profile {profile_name}")
        values.update(file_values)
        values.update(env_values)
        values.update(flat_overrides)
        values["profile"] = (profile_name, "profile selection")

        config = _build(values)
        logger.debug("loaded config: profile=%s file=%s", profile_name, file_path)
        return config

    def replace(self, overrides: Mapping[str, Any]) -> AgentConfig:
        """Return a copy with `overrides` applied (dotted keys or nested dicts), validated."""
        values: dict[str, tuple[Any, str]] = {}
        for key, value in _flat_items(self.to_dict()):
            values[key] = (value, "existing config")
        values.update(_flatten(overrides, source="override"))
        return _build(values)

    # -- output -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-compatible nested dicts (paths as strings, tuples as lists)."""
        return _to_jsonable(dataclasses.asdict(self))

    @property
    def effective_tls_dir(self) -> Path:
        """Directory that holds the TLS credentials: `tls_dir`, else `<data_dir>/tls`."""
        return self.tls_dir if self.tls_dir is not None else self.data_dir / "tls"

    @staticmethod
    def documentation() -> list[FieldDoc]:
        """List every key with its type, default, description and accepted range."""
        docs: list[FieldDoc] = []
        for key, f, owner in _all_fields():
            hints = typing.get_type_hints(owner)
            docs.append(FieldDoc(
                key=key,
                type_name=_type_name(hints[f.name]),
                default=_to_jsonable(_default_of(f)),
                doc=f.metadata.get("doc", ""),
                range_text=_range_text(f),
            ))
        return docs


# -- loading helpers ---------------------------------------------------------------------------


def _resolve_path(path: Path | str | None, use_default_path: bool) -> Path | None:
    if path is not None:
        resolved = Path(path)
        if not resolved.is_file():
            raise ConfigError(f"config file {str(resolved)!r} not found; pass an existing "
                              "TOML file or omit --config to use defaults", value=str(resolved))
        return resolved
    if use_default_path and DEFAULT_CONFIG_PATH.is_file():
        return DEFAULT_CONFIG_PATH
    return None


def _read_toml(path: Path) -> dict[str, tuple[Any, str]]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}",
                          value=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} could not be read: {exc.strerror}",
                          value=str(path)) from None
    return _flatten(document, source=str(path))


def _read_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """Map `SHARDMESH_<SECTION>_<FIELD>` and `SHARDMESH_<FIELD>` variables to dotted keys.

    Variables under a known section prefix with an unknown field are errors (a typo). Other
    `SHARDMESH_*` variables, such as ones the CLI reads itself, are ignored.
    """
    values: dict[str, tuple[Any, str]] = {}
    top_level = {f.name for f in dataclasses.fields(AgentConfig) if f.name not in _SECTIONS}
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX):].lower()
        section, _, name = rest.partition("_")
        if section in _SECTIONS and name:
            values[f"{section}.{name}"] = (raw, var)
        elif rest in top_level:
            values[rest] = (raw, var)
    return values


def _flatten(tree: Mapping[str, Any], *, source: str) -> dict[str, tuple[Any, str]]:
    """Flatten `{"timing": {"lease_s": 1}}` and `{"timing.lease_s": 1}` to dotted keys."""
    flat: dict[str, tuple[Any, str]] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} is not a string", key=str(key), source=source)
        if key in _SECTIONS and isinstance(value, Mapping):
            for name, inner in value.items():
                flat[f"{key}.{name}"] = (inner, source)
        else:
            flat[key] = (value, source)
    return flat


def _flat_items(tree: Mapping[str, Any]) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if key in _SECTIONS:
            items.extend((f"{key}.{name}", inner) for name, inner in value.items())
        else:
            items.append((key, value))
    return items


def _choose_profile(*sources: dict[str, tuple[Any, str]]) -> str:
    for values in sources:
        if "profile" in values:
            name, origin = values["profile"]
            if name not in PROFILES:
                raise ConfigError(f"profile {name!r} is unknown; accepted: "
                                  f"{', '.join(PROFILES)}", key="profile", value=name,
                                  source=origin)
            return str(name)
    return "lan"


def _all_fields() -> list[tuple[str, dataclasses.Field[Any], type]]:
    """List (dotted key, field, owning class) for every leaf field."""
    result: list[tuple[str, dataclasses.Field[Any], type]] = []
    for f in dataclasses.fields(AgentConfig):
        if f.name in _SECTIONS:
            section_cls = _SECTIONS[f.name]
            result.extend((f"{f.name}.{g.name}", g, section_cls)
                          for g in dataclasses.fields(section_cls))
        else:
            result.append((f.name, f, AgentConfig))
    return result


def _build(values: dict[str, tuple[Any, str]]) -> AgentConfig:
    known = {key: (f, owner) for key, f, owner in _all_fields()}
    for key, (value, source) in values.items():
        if key not in known:
            _raise_unknown_key(key, value, source, known)

    section_kwargs: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    top_kwargs: dict[str, Any] = {}
    for key, (raw, source) in values.items():
        f, owner = known[key]
        hint = typing.get_type_hints(owner)[f.name]
        value = _coerce(key, raw, hint, source)
        _check_range(key, value, f, source)
        if "." in key:
            section, name = key.split(".", 1)
            section_kwargs[section][name] = value
        else:
            top_kwargs[key] = value

    sections = {name: _SECTIONS[name](**kwargs) for name, kwargs in section_kwargs.items()}
    return AgentConfig(**top_kwargs, **sections)


def _raise_unknown_key(key: str, value: Any, source: str,
                       known: Mapping[str, Any]) -> typing.NoReturn:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known sections: {', '.join(_SECTIONS)}"
    raise ConfigError(f"config key {key!r} is unknown{hint}", key=key, value=value,
                      source=source)


# -- type coercion and range checks -----------------------------------------------------------

_TRUE_WORDS = {"1", "true", "yes", "on"}
_FALSE_WORDS = {"0", "false", "no", "off"}
_NONE_WORDS = {"", "none", "null"}


def _coerce(key: str, raw: Any, hint: Any, source: str) -> Any:
    """Convert `raw` (typed from TOML or overrides, or a string from env/CLI) to `hint`."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)

    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE_WORDS):
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(key, raw, inner, source)

    if origin is tuple:
        if isinstance(raw, str):
            items = [part.strip() for part in raw.split(",") if part.strip()]
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise _type_error(key, raw, "a list of strings (or a comma-separated string)",
                              source)
        for item in items:
            if not isinstance(item, str):
                raise _type_error(key, raw, "a list of strings", source)
        return tuple(items)

    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return raw.strip().lower() in _TRUE_WORDS
        raise _type_error(key, raw, "a boolean (true/false, 1/0, yes/no, on/off)", source)

    if hint is int:
        if isinstance(raw, bool):
            raise _type_error(key, raw, "an integer", source)
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip().replace("_", ""), 0)
            except ValueError:
                pass
        raise _type_error(key, raw, "an integer", source)

    if hint is float:
        if isinstance(raw, bool):
            raise _type_error(key, raw, "a number", source)
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                pass
        raise _type_error(key, raw, "a number", source)

    if hint is Path:
        if isinstance(raw, (str, Path)) and str(raw):
            return Path(raw).expanduser()
        raise _type_error(key, raw, "a non-empty path string", source)

    if hint is str:
        if isinstance(raw, str):
            return raw
        raise _type_error(key, raw, "a string", source)

    raise ConfigError(f"config key {key!r} has unsupported type {hint!r}", key=key,
                      value=raw, source=source)


def _type_error(key: str, raw: Any, expected: str, source: str) -> ConfigError:
    return ConfigError(f"config key {key!r} has invalid value {raw!r}: expected {expected}",
                       key=key, value=raw, source=source)


def _check_range(key: str, value: Any, f: dataclasses.Field[Any], source: str) -> None:
    if value is None:
        return
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key {key!r} has invalid value {value!r}: accepted "
                          f"{', '.join(map(str, choices))}", key=key, value=value, source=source)
    low, high = meta.get("min"), meta.get("max")
    if low is None and high is None:
        return
    if value != value:  # NaN compares unequal to itself and passes every range check.
        raise ConfigError(f"config key {key!r} has invalid value {value!r}: accepted range "
                          f"{_range_text(f)}", key=key, value=value, source=source)
    too_low = low is not None and (value <= low if meta.get("min_open") else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        raise ConfigError(f"config key {key!r} has value {value!r} out of range: accepted "
                          f"{_range_text(f)}", key=key, value=value, source=source)


def _range_text(f: dataclasses.Field[Any]) -> str:
    meta = f.metadata
    if meta.get("choices") is not None:
        return "one of " + ", ".join(map(str, meta["choices"]))
    low, high = meta.get("min"), meta.get("max")
    if low is None and high is None:
        return ""
    left = "(" if meta.get("min_open") else "["
    return f"{left}{_fmt(low)}, {_fmt(high)}]"


def _fmt(bound: float | None) -> str:
    if bound is None:
        return "inf"
    if isinstance(bound, float) and bound.is_integer():
        return str(int(bound)) if abs(bound) < 1e15 else repr(bound)
    return str(bound)


# -- cross-field rules -------------------------------------------------------------------------


def _validate(config: AgentConfig) -> None:
    """Check rules that involve more than one field; single-field ranges are checked earlier.

    Each rule is checked here rather than in the section classes so that an error can name both
    keys and both values.
    """
    t = config.timing
    _require(t.election_timeout_min_s < t.election_timeout_max_s,
             "timing.election_timeout_min_s", t.election_timeout_min_s,
             f"must be below timing.election_timeout_max_s ({t.election_timeout_max_s})")
    _require(t.lease_s < t.election_timeout_min_s, "timing.lease_s", t.lease_s,
             f"must be below timing.election_timeout_min_s ({t.election_timeout_min_s}), "
             "otherwise a deposed coordinator can act after a new one is elected")
    _require(t.heartbeat_interval_s < t.suspect_after_s, "timing.heartbeat_interval_s",
             t.heartbeat_interval_s,
             f"must be below timing.suspect_after_s ({t.suspect_after_s}), otherwise every "
             "member is suspected between two heartbeats")
    _require(t.heartbeat_interval_s < t.election_timeout_min_s, "timing.heartbeat_interval_s",
             t.heartbeat_interval_s,
             f"must be below timing.election_timeout_min_s ({t.election_timeout_min_s}), "
             "otherwise voters start elections while the coordinator is healthy")
    _require(t.suspect_after_s < t.dead_after_s, "timing.suspect_after_s", t.suspect_after_s,
             f"must be below timing.dead_after_s ({t.dead_after_s})")
    _require(t.indirect_probe_timeout_s < t.dead_after_s, "timing.indirect_probe_timeout_s",
             t.indirect_probe_timeout_s,
             f"must be below timing.dead_after_s ({t.dead_after_s})")
    _require(t.reconnect_backoff_min_s <= t.reconnect_backoff_max_s,
             "timing.reconnect_backoff_min_s", t.reconnect_backoff_min_s,
             f"must not exceed timing.reconnect_backoff_max_s ({t.reconnect_backoff_max_s})")

    e = config.election
    _require(not (e.witness and not e.voter), "election.witness", e.witness,
             "requires election.voter = true, because a witness exists only to vote")

    n = config.network
    for entry in n.static_peers:
        try:
            parse_host_port(entry)
        except ValueError as exc:
            raise ConfigError(f"config key 'network.static_peers' has invalid entry "
                              f"{entry!r}: {exc}", key="network.static_peers",
                              value=entry) from None


def _require(condition: bool, key: str, value: Any, rule: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key!r} has invalid value {value!r}: {rule}",
                          key=key, value=value)


def parse_host_port(entry: str) -> tuple[str, int]:
    """Split "host:port" or "[v6addr]:port" into (host, port); raise ValueError when invalid."""
    text = entry.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [address]:port for an IPv6 address")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("expected host:port (write IPv6 addresses as [address]:port)")
    if not host:
        raise ValueError("the host part is empty")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not an integer in [1, 65535]")
    return host, int(port_text)


# -- output helpers ----------------------------------------------------------------------------


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _to_jsonable(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(inner) for inner in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "list of strings"
    if args and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return f"{_type_name(inner)} or none"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            Path: "path"}.get(hint, str(hint))


def render_example_toml() -> str:
    """Render a TOML file listing every key, commented out at its default, with its description.

    systemd/agent.toml.example is this output; a test keeps the two equal.
    """
    lines = [
        "# shardmesh agent configuration (/etc/shardmesh/agent.toml).",
        "#",
        "# Every key is listed at its default and commented out; uncomment what you change.",
        "# Environment variables override this file (SHARDMESH_<SECTION>_<KEY>, for example",
        "# SHARDMESH_TIMING_HEARTBEAT_INTERVAL_S=1.0), and command-line flags override both.",
        "# Keys without a value (none) are unset by default and have no TOML form until set.",
        "",
    ]
    current_section = ""
    for doc in AgentConfig.documentation():
        section, _, name = doc.key.rpartition(".")
        if section != current_section:
            current_section = section
            lines.append(f"[{section}]")
            lines.append("")
        for text in _wrap(doc.doc, 96):
            lines.append(f"# {text}")
        detail = f"type: {doc.type_name}"
        if doc.range_text:
            detail += f"; accepted: {doc.range_text}"
        lines.append(f"# ({detail})")
        lines.append(f"# {name or doc.key} = {_toml_value(doc.default)}")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _wrap(text: str, width: int) -> list[str]:
    words = text.split()
    lines: list[str] = []
    current = ""
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(current)
    return lines


def _toml_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")
