"""The hub's settings, from environment variables `EHI_HUB_*` (nested with `__`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cloud_hub.auth import AuthSettings
from cloud_hub.errors import HubConfigError
from cloud_hub.roles import parse_roles
from fleet.contract.errors import BundleError
from fleet.contract.protocol import HUB_SHARE_GROUP, NAME_PATTERN, Channel
from fleet.contract.signing import PublicKey
from fleet.transport.mqtt import BrokerSettings
from fleet.transport.strict_settings import Section, describe_errors, unknown_env


class HubMqtt(BrokerSettings):
    # Subscribe through `$share/hub/...` so that N replicas split the work.
    shared: bool = True
    # The shared subscription's group. Mosquitto's access rules cannot refuse a subscription,
    # only deliveries: a device that joined the hubs' group would take its turn at the
    # deliveries and have them refused, so the hubs' offloads would be lost. On a confined
    # broker the group is a secret only hubs know (`fleet pki init` writes one).
    share_group: str = Field(HUB_SHARE_GROUP, pattern=r"^[A-Za-z0-9_-]{1,64}$")


class DeviceQuota(Section):
    """Messages per second one device may send on each channel, with bursts of `burst_s`
    seconds' worth; beyond, they are counted (`ehi_hub_bad_messages_total{reason="quota"}`) and
    dropped: results and hard examples the device sends again until they are acknowledged, a
    dropped offload is answered at the edge when its deadline passes, telemetry comes again.
    Status and reports are not dropped but the newest is kept and stored a second later. 0: no
    limit on that channel."""

    offload_per_s: float = Field(500.0, ge=0)
    results_per_s: float = Field(100.0, ge=0)
    hard_per_s: float = Field(50.0, ge=0)
    telemetry_per_s: float = Field(2.0, ge=0)
    status_per_s: float = Field(2.0, ge=0)
    reported_per_s: float = Field(2.0, ge=0)
    burst_s: float = Field(10.0, gt=0)

    def buckets(self) -> dict[Channel, tuple[float, int]]:
        out: dict[Channel, tuple[float, int]] = {}
        for c in (Channel.OFFLOAD, Channel.RESULTS, Channel.HARD, Channel.TELEMETRY,
                  Channel.STATUS, Channel.REPORTED):
            rate = float(getattr(self, f"{c.value}_per_s"))
            if rate > 0:
                out[c] = (rate, max(5, round(rate * self.burst_s)))
        return out


class HubSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EHI_HUB_", env_nested_delimiter="__",
                                      extra="forbid")

    database_url: str = "sqlite:///hub.db"
    # Bring the schema to the newest migration at start (one process). Replicas set it false
    # and a Job runs `cloud-hub migrate` once per release; they refuse an older schema.
    migrate_on_start: bool = True
    # The cloud model's bundle (a directory with manifest.json). Required to answer offloads;
    # the repository's is models/bundles/digits-cloud (`fleet demo` and the lab pass it).
    cloud_bundle: Path | None = None
    backend: Literal["auto", "onnxruntime", "openvino"] = "onnxruntime"
    threads: int = Field(1, ge=1, le=64)
    # This replica's name: its MQTT client id, its heartbeat topic, its metrics label.
    replica_id: str = Field("hub-0", pattern=NAME_PATTERN)
    # A worker (ingest, control, offloads, rollouts, broker heartbeat) whose step runs this
    # long, or whose messages wait this long with none stored, is stalled: /readyz turns 503
    # and names it.
    worker_stall_s: float = Field(30.0, gt=0)
    # What this process takes from the devices (cloud_hub/roles.py): "answer" (offloads),
    # "store" (results, hard examples, telemetry, status, reports), or both.
    roles: str = "answer,store"
    mqtt: HubMqtt = HubMqtt()
    # Dynamic batching of offloads: up to `batch_max` inputs, waiting at most `batch_wait_ms` for
    # a batch to fill. 0 ms takes only what is already queued (lowest latency).
    batch_max: int = Field(64, ge=1, le=4096)
    batch_wait_ms: float = Field(0.0, ge=0)
    # Answer an offload on the MQTT thread itself when nothing is queued and the model's recent
    # single-input time is below this (saves a thread hand-off); 0 always uses the batcher.
    inline_max_ms: float = Field(1.0, ge=0)
    # Bounded queues between the MQTT thread and the workers; beyond them messages are refused.
    offload_queue: int = Field(10_000, ge=1)
    ingest_queue: int = Field(10_000, ge=1)
    device_quota: DeviceQuota = DeviceQuota()
    # On SIGTERM: take no new messages and finish the held ones for at most this long (keep it
    # below the pod's termination grace period, 30 s in deploy/k3s).
    shutdown_drain_s: float = Field(10.0, ge=0)
    # Paging limit of /v1/results.
    max_page: int = Field(1000, ge=1)
    # Model registry: where bundle files live. "local": in `artifacts_dir` (one replica);
    # "database": in the hub's database, so every replica serves what any of them stored.
    artifact_store: Literal["local", "database"] = "local"
    # Uploads are staged here in both cases (and the local store keeps its files here).
    artifacts_dir: Path = Path("hub-artifacts")
    # An upload (the bundle's tar) larger than this is refused while it streams in.
    max_bundle_bytes: int = Field(512 << 20, ge=1 << 10)
    # Public keys (base64, from `fleet keys generate`) whose signatures the registry accepts.
    # Empty: every upload is refused with a message saying so.
    trusted_keys: list[str] = Field(default_factory=list)
    # The hub's own Ed25519 key, signing the desired-model assignments; made on first start
    # (with its .pub beside it, which the agents pin as `update.hub_keys`).
    assignment_key: Path = Path("hub-assignment.key")
    # How often the rollout controller steps every running rollout.
    rollout_tick_s: float = Field(1.0, gt=0)
    # A static bearer token with the admin role. With auth.mode "open" it guards every change
    # (reads stay open): the behaviour before roles. With "jwt" it is a break-glass admin
    # token beside the JWTs. The fleet CLI sends $EHI_FLEET_TOKEN.
    api_token: SecretStr | None = None
    # Tokens, roles, rate limits, body limits (cloud_hub/auth.py, docs/security.md).
    auth: AuthSettings = AuthSettings()

    def trusted(self) -> list[PublicKey]:
        return [PublicKey.from_text(k) for k in self.trusted_keys]

    @field_validator("roles")
    @classmethod
    def _roles_known(cls, v: str) -> str:
        return ",".join(sorted(parse_roles(v)))

    def role_set(self) -> frozenset[str]:
        return parse_roles(self.roles)

    @field_validator("trusted_keys")
    @classmethod
    def _keys_parse(cls, v: list[str]) -> list[str]:
        for k in v:
            try:
                PublicKey.from_text(k)
            except BundleError as exc:
                raise ValueError(str(exc)) from None
        return v


def load_hub_settings(**overrides: object) -> HubSettings:
    """The hub's settings from `EHI_HUB_*` and `overrides`; HubConfigError naming every
    problem: a value that does not hold, or a variable that names no setting (with the
    closest one that does)."""
    typos = unknown_env(HubSettings, "EHI_HUB_", os.environ)
    if typos:
        raise HubConfigError("invalid hub settings:\n" + "\n".join(typos))
    try:
        return HubSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise HubConfigError("invalid hub settings:\n" + "\n".join(
            describe_errors(HubSettings, exc.errors()))) from None
