"""The agent's settings: a TOML file, overridden by environment variables `EHI_AGENT_*`.

Nested keys use `__` in the environment, e.g. `EHI_AGENT_MQTT__HOST=broker.local`.
See docs/configuration.md for every key.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edge_agent.errors import ConfigError
from fleet.contract.errors import BundleError
from fleet.contract.signing import PublicKey
from fleet.inference.backends.base import BackendOptions, default_cache_dir
from fleet.transport.mqtt import BrokerSettings
from fleet.transport.strict_settings import Section, describe_errors, unknown_env

CONFIG_ENV = "EHI_AGENT_CONFIG"
NO_BUNDLE = ("no model bundle: set `bundle` in the agent's settings (or EHI_AGENT_BUNDLE) to a "
             "bundle directory; this repository's digits model is models/bundles/digits-edge")


def default_state_dir() -> Path:
    """Where an agent keeps state that must survive restarts (the outbox): $XDG_STATE_HOME."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edge-hybrid-inference"


class OffloadSettings(Section):
    # How long an input may wait for the cloud before the edge answer is final (degraded).
    deadline_ms: float = Field(200.0, gt=0)
    # The longest deadline an application may ask for (`deadline_ms` of a request).
    max_deadline_ms: float = Field(60_000.0, gt=0)
    # Offloads waiting for an answer at once; beyond it hard inputs are answered at the edge.
    max_pending: int = Field(256, ge=1)
    # Keep hard inputs whose cloud answer did not come in time (offline, deadline, busy) in the
    # outbox; the hub answers them late and stores them for statistics and retraining.
    late_answers: bool = True
    # "threshold": a fixed threshold (`threshold` if set, else the one this device calibrated
    # on the bundle's fidelity set for the bundle's offload budget, else the manifest's).
    # "budget": the offload controller moves the threshold so the device offloads `target` of
    # its inputs whatever they look like (docs/offload-budget.md). The hub may set both per
    # device (`fleet devices offload`); its setting wins over this file.
    mode: Literal["threshold", "budget"] = "threshold"
    # The share of inputs to offload in "budget" mode; None: the bundle's offload budget.
    target: float | None = Field(None, gt=0, lt=1)
    # A byte budget for metered links, in "budget" mode: offload payloads at most this many
    # bytes per second on average (the target share is lowered to fit); None: no cap.
    max_bytes_per_s: float | None = Field(None, gt=0)


class ResultsSettings(Section):
    """The outbox: result records and hard examples kept until the hub has committed them."""

    # "sqlite": durable, survives kill -9 and reboots. "memory": lost with the process.
    store: Literal["sqlite", "memory"] = "sqlite"
    # None: $XDG_STATE_HOME/edge-hybrid-inference/outbox-{device_id}. One agent per folder.
    outbox_dir: Path | None = None
    # Each entry also flushed to the storage medium before the answer returns: survives a power
    # cut too, at the cost of an fdatasync per answer.
    fsync: bool = False
    # Bounds of the outbox; beyond them `on_full` says what goes (every loss is counted).
    max_entries: int = Field(100_000, ge=1)
    max_bytes: int = Field(256 << 20, ge=1 << 16)
    max_age_s: float = Field(7 * 24 * 3600.0, gt=0)
    on_full: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    batch_max: int = Field(100, ge=1, le=1000)
    # A message stays under this many bytes (brokers cap message sizes; Mosquitto's
    # message_size_limit, EMQX's max_packet_size).
    batch_max_bytes: int = Field(256 << 10, ge=1 << 12, le=4 << 20)
    # A batch is sent when full or this long after its first record.
    flush_interval_s: float = Field(0.2, gt=0)
    # Unacknowledged entries are sent again after this long (the hub ingests idempotently);
    # each further resend without an ack between waits twice as long (with +-25% jitter, so a
    # fleet does not resend in step), up to `resend_max_s`. An ack or a cloud answer (the hub
    # is back) starts again from `resend_after_s`.
    resend_after_s: float = Field(5.0, gt=0)
    resend_max_s: float = Field(120.0, gt=0)
    # Draining a backlog after an outage: at most this many entries per second, and at most
    # `max_inflight` sent and not yet acknowledged, so a fleet coming back does not flood the hub.
    drain_rate: float = Field(2000.0, gt=0)
    max_inflight: int = Field(1000, ge=1)


class UpdateSettings(Section):
    """Model updates from the hub: signed bundles, health-checked, switched atomically."""

    enabled: bool = False
    # The hub's HTTP API, where bundle files are downloaded from (e.g. http://hub:8080).
    hub_url: str | None = None
    # The fleet's bundle-signing public keys (one line of base64 each, `fleet keys generate`):
    # a bundle or rollback directive signed by none of them is refused.
    trusted_keys: list[str] = Field(default_factory=list)
    # The hub's assignment-signing public keys (`GET /v1/keys` on the hub).
    hub_keys: list[str] = Field(default_factory=list)
    # Slots, pointer and update state. None: $XDG_STATE_HOME/edge-hybrid-inference/models-{id}.
    models_dir: Path | None = None
    # Tags this device matches against a manifest's `hardware` list.
    hardware: list[str] = Field(default_factory=lambda: [platform.machine()])
    # A bundle larger than this (all files) is refused before anything is downloaded.
    max_bundle_bytes: int = Field(512 << 20, ge=1)
    # Download bandwidth cap in bytes/s (0: none), for metered or shared links.
    download_rate: float = Field(0.0, ge=0)

    def keys(self) -> tuple[list[PublicKey], list[PublicKey]]:
        return ([PublicKey.from_text(k) for k in self.trusted_keys],
                [PublicKey.from_text(k) for k in self.hub_keys])


class LocalApiSettings(Section):
    host: str = "127.0.0.1"
    # 0 picks a free port; -1 disables the local API.
    port: int = Field(8750, ge=-1, le=65535)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # Connections served at once (one thread each); beyond it a connection gets 503 and is
    # closed. A connection idle (or sending slower than this) for `idle_timeout_s` is closed.
    max_connections: int = Field(64, ge=1, le=4096)
    idle_timeout_s: float = Field(30.0, gt=0)


class ThroughputSettings(Section):
    """How the agent serves inputs that arrive faster than one inference at a time.

    "latency" (default): each request runs at once on its own thread (backends run requests in
    parallel: onnxruntime sessions are thread-safe, OpenVINO keeps a pool of infer requests).
    "batch": requests are gathered into batches of up to `max_batch`, waiting at most
    `max_wait_ms` after the first, and run as one model call.
    """

    mode: Literal["latency", "batch"] = "latency"
    max_batch: int = Field(8, ge=1, le=1024)
    max_wait_ms: float = Field(2.0, ge=0)
    # Requests waiting to be batched; beyond it the local API answers 503.
    max_queue: int = Field(1024, ge=1)


class ReplaySettings(Section):
    """A built-in source feeding a stream file (.npz with `{stream}_x` arrays) into the agent."""

    file: Path | None = None
    stream: str = "mixed"
    shard_index: int = Field(0, ge=0)
    shard_count: int = Field(1, ge=1)
    # Inputs per second; 0 replays as fast as the agent answers.
    rate_hz: float = Field(100.0, ge=0)
    limit: int | None = Field(None, ge=1)
    # Leave once the replay is done and the hub has acknowledged every result.
    exit_when_done: bool = False


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EHI_AGENT_", env_nested_delimiter="__",
                                      extra="forbid")

    device_id: str = Field(default_factory=lambda: socket.gethostname().split(".")[0])
    # The model bundle the agent serves (a directory with manifest.json): required, unless a
    # model update already installed one. This repository's is models/bundles/digits-edge.
    bundle: Path | None = None
    backend: Literal["auto", "onnxruntime", "openvino"] = "auto"
    threads: int = Field(1, ge=1, le=64)
    # OpenVINO's performance hint: LATENCY (one input at a time) or THROUGHPUT (batches).
    openvino_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"
    # Compiled models and the measured `auto` backend choice live here between starts.
    cache_dir: Path | None = Field(default_factory=default_cache_dir)
    # None: the policy and threshold recommended by the bundle's manifest.
    policy: str | None = None
    threshold: float | None = None
    # The fidelity check before a backend serves a bundle: "enforce" refuses a backend whose
    # answers on the bundle's fidelity set fall below the bundle's floor (`auto` then takes
    # the next one); "report" serves anyway and reports the figures; "off" skips the check.
    fidelity: Literal["enforce", "report", "off"] = "enforce"
    telemetry_interval_s: float = Field(10.0, gt=0)
    # The protocol version this agent writes (fleet/contract/protocol.py): 2, compact and
    # compressed, needs a hub of this release or newer; 1 for an older hub (upgrade the hubs
    # first, then the agents).
    wire_version: Literal[1, 2] = 2
    labels: dict[str, str] = Field(default_factory=dict)
    summary_path: Path | None = None
    mqtt: BrokerSettings = BrokerSettings()
    offload: OffloadSettings = OffloadSettings()
    results: ResultsSettings = ResultsSettings()
    local_api: LocalApiSettings = LocalApiSettings()
    throughput: ThroughputSettings = ThroughputSettings()
    replay: ReplaySettings = ReplaySettings()
    update: UpdateSettings = UpdateSettings()

    def outbox_path(self) -> Path:
        return self.results.outbox_dir or default_state_dir() / f"outbox-{self.device_id}"

    def models_path(self) -> Path:
        return self.update.models_dir or default_state_dir() / f"models-{self.device_id}"

    @model_validator(mode="after")
    def _update_needs_keys(self) -> AgentSettings:
        u = self.update
        if u.enabled:
            missing = [k for k in ("hub_url", "trusted_keys", "hub_keys") if not getattr(u, k)]
            if missing:
                raise ValueError(f"update.enabled needs update.{', update.'.join(missing)}")
        try:
            u.keys()
        except BundleError as exc:
            raise ValueError(f"update keys: {exc}") from None
        return self

    def backend_options(self) -> BackendOptions:
        return BackendOptions(threads=self.threads, openvino_hint=self.openvino_hint,
                              cache_dir=self.cache_dir)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        from fleet.contract.protocol import check_device_id

        check_device_id(v)
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        from fleet.contract.selectors import label_problems

        bad = label_problems(v)
        if bad:
            raise ValueError("; ".join(bad))
        return v

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)


def load_settings(config: Path | None = None, **overrides: object) -> AgentSettings:
    """Settings from `config` (TOML), the environment and explicit overrides, in rising priority.

    Without `config`, the file named by $EHI_AGENT_CONFIG is read, if set.
    """
    if config is None and os.environ.get(CONFIG_ENV):
        config = Path(os.environ[CONFIG_ENV])
    cls: type[AgentSettings] = AgentSettings
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"config file {config} does not exist")
        cls = type("AgentSettingsFromFile", (AgentSettings,),
                   {"model_config": {**AgentSettings.model_config, "toml_file": config}})
    typos = unknown_env(AgentSettings, "EHI_AGENT_", os.environ, exempt=frozenset({CONFIG_ENV}))
    if typos:
        raise ConfigError("invalid agent settings:\n" + "\n".join(typos))
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = describe_errors(AgentSettings, exc.errors())
        raise ConfigError("invalid agent settings:\n" + "\n".join(lines)) from None
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"cannot read agent settings: {exc}") from None


TomlValue = str | int | float | bool | Path | list[str] | dict[str, "TomlValue"]


def _toml_value(v: TomlValue) -> str:
    if isinstance(v, dict):  # a table inside a section: an inline table
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def settings_toml(values: dict[str, TomlValue | dict[str, TomlValue]]) -> str:
    """Agent settings as a TOML file's text: top-level keys, then one table per section
    (`{"mqtt": {"port": 1883}}` becomes `[mqtt]`). The text is checked by loading it, so a
    misspelt key or a bad value fails here, not in the started daemon."""
    top = [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
              for k, v in values.items() if isinstance(v, dict)]
    text = "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # a value our writer cannot express
        raise ConfigError(f"cannot write agent settings as TOML: {exc}") from None
    return text


def write_settings(path: Path, values: dict[str, TomlValue | dict[str, TomlValue]]) -> Path:
    """Write agent settings to `path` (TOML) and check them as the daemon will read them."""
    path.write_text(settings_toml(values))
    load_settings(path)
    return path
