"""`fleet demo`: broker, hub and N agents on one machine, and the report of what the loop did."""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import TomlValue, write_settings
from fleet.cli.hub_client import HubClient, HubClientError
from fleet.contract.errors import FleetError
from fleet.contract.protocol import Offload
from fleet.lab.brokers import RunningBroker, start_broker
from fleet.lab.percentiles import percentile
from fleet.lab.processes import ManagedProcess, ProcessGroup, start_hub, work_folder
from fleet.lab.wire_cost import cloud_only_bytes_per_input
from fleet.transport.ports import free_port
from models import CLOUD_BUNDLE, DEMO_KEY, DEMO_PUBLIC_KEY, EDGE_BUNDLE, STREAMS_FILE

log = logging.getLogger(__name__)

HUB_START_TIMEOUT_S = 60.0
# After the agents are done: how long the hub may take to show every result.
RESULTS_SETTLE_TIMEOUT_S = 30.0
POLL_S = 0.25


@dataclass(frozen=True)
class DemoOptions:
    devices: int = 4
    stream: str = "mixed"
    samples: int | None = None
    policy: str | None = None
    threshold: float | None = None
    backend: str = "auto"
    # The agents' offload mode ("threshold" or "budget") and, for "budget", the target share.
    offload: str = "threshold"
    target: float | None = None
    broker: str = "auto"
    rate_hz: float = 100.0
    deadline_ms: float = 200.0
    workdir: Path | None = None
    keep: bool = False
    # Push a new version of the edge model to the hub's registry while the agents run, and
    # assign it to each device as it comes online: they switch models mid-stream.
    update: bool = True
    # The same loop on a confined broker: a fleet CA, every agent and the hub with an identity
    # of their own (client certificates over TLS, "mtls", or passwords over TLS, "password"),
    # the broker's access rules, and the API with roles (every call with an operator's JWT).
    # None: an open local broker and API.
    secure: str | None = None


Progress = Callable[[int, int], None]


# The demo's calls to the hub (results, devices, the update) answer in milliseconds.
HUB_TIMEOUT_S = 30.0


def _wait_ready(url: str, proc: ManagedProcess, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise FleetError(f"the hub exited during start-up:\n{proc.tail()}")
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(POLL_S)
    raise FleetError(f"the hub was not ready within {timeout:.0f} s:\n{proc.tail()}")


def _agent_toml(i: int, o: DemoOptions, broker: RunningBroker, n_samples: int,
                workdir: Path, hub_url: str, secure: dict[str, TomlValue] | None = None) -> Path:
    limit = len(range(i, n_samples, o.devices))
    offload: dict[str, TomlValue] = {"deadline_ms": o.deadline_ms, "mode": o.offload}
    if o.target is not None:
        offload["target"] = o.target
    values: dict[str, TomlValue | dict[str, TomlValue]] = {
        "device_id": f"demo-{i}", "backend": o.backend, "telemetry_interval_s": 1.0,
        "summary_path": workdir / f"agent-{i}.json", "bundle": EDGE_BUNDLE,
        **({"policy": o.policy} if o.policy else {}),
        **({"threshold": o.threshold} if o.threshold is not None else {}),
        "mqtt": ({"port": broker.port, "protocol": broker.protocol} if secure is None
                 else {**secure, "protocol": broker.protocol}),
        "offload": offload,
        "local_api": {"port": -1},
        # Each run's outboxes live in its workdir: an interrupted run leaves nothing behind
        # for the next run's fresh hub.
        "results": {"outbox_dir": workdir / f"outbox-{i}"},
        "replay": {"file": STREAMS_FILE, "stream": o.stream, "shard_index": i,
                   "shard_count": o.devices, "rate_hz": o.rate_hz, "limit": max(limit, 1),
                   "exit_when_done": True},
    }
    if o.update:
        values["update"] = {"enabled": True, "hub_url": hub_url,
                            "trusted_keys": [DEMO_PUBLIC_KEY.read_text().strip()],
                            "hub_keys": [(workdir / "hub.pub").read_text().strip()],
                            "models_dir": workdir / f"models-{i}"}
    return write_settings(workdir / f"agent-{i}.toml", values)


def run_demo(o: DemoOptions, progress: Progress | None = None) -> dict[str, Any]:
    if o.devices < 1:
        raise FleetError("--devices must be at least 1")
    if o.offload not in ("threshold", "budget"):
        raise FleetError(f"--offload {o.offload!r}: choose threshold or budget")
    if o.target is not None and not 0 < o.target < 1:
        raise FleetError(f"--target {o.target}: a share of inputs, between 0 and 1")
    with np.load(STREAMS_FILE) as data:
        if f"{o.stream}_x" not in data:
            raise FleetError(f"unknown stream {o.stream!r}; choose clean, shifted or mixed")
        x_all, y_all = data[f"{o.stream}_x"], data[f"{o.stream}_y"]
    n = min(o.samples or len(x_all), len(x_all))
    if n < o.devices:
        raise FleetError(f"--samples {n} is fewer than --devices {o.devices}")
    x, y = x_all[:n], y_all[:n]
    t_start = time.monotonic()
    with work_folder(o.workdir, "ehi-demo-", o.keep) as workdir, ProcessGroup() as group:
        hub_env = {"EHI_HUB_TRUSTED_KEYS": json.dumps([DEMO_PUBLIC_KEY.read_text().strip()])}
        agent_mqtt: list[dict[str, TomlValue] | None] = [None] * o.devices
        token = None
        if o.secure is None:
            broker = start_broker(group, workdir, o.broker)
        else:
            broker, hub_env_secure, agent_mqtt = _secure_fleet(group, workdir, o)
            # The API with roles: a bootstrap admin token, from which the demo takes an
            # operator's token for its own calls (every read needs one too).
            token = secrets.token_urlsafe(32)
            hub_env |= hub_env_secure | {"EHI_HUB_API_TOKEN": token,
                                         "EHI_HUB_AUTH__MODE": "jwt",
                                         "EHI_HUB_AUTH__SECRET_FILE": str(workdir / "jwt.secret")}
        hub_env["EHI_HUB_MQTT__PROTOCOL"] = broker.protocol
        hub_port = free_port()
        hub_url = f"http://127.0.0.1:{hub_port}"
        hub = start_hub(group, workdir, port=hub_port, broker_port=broker.port,
                        log_path=workdir / "hub.log", env=hub_env)
        _wait_ready(hub_url, hub, HUB_START_TIMEOUT_S)
        if token is not None:
            with HubClient(hub_url, token=token) as admin:
                token = admin.post("/v1/tokens", json={"subject": "fleet-demo",
                                                       "role": "operator"})["token"]
        with HubClient(hub_url, token=token, timeout_s=HUB_TIMEOUT_S) as hub_api:
            update = _Update(hub_api, workdir) if o.update else None
            agents = [group.start(f"agent-{i}", [sys.executable, "-m", "edge_agent.cli", "run",
                                                 "--config", str(_agent_toml(
                                                     i, o, broker, n, workdir, hub_url,
                                                     agent_mqtt[i]))],
                                  workdir / f"agent-{i}.log") for i in range(o.devices)]
            at_hub = _follow(hub_api, agents, n, progress, update)
            summaries = []
            for i, a in enumerate(agents):
                if a.proc.returncode != 0:
                    raise FleetError(f"agent {i} failed (exit {a.proc.returncode}):\n{a.tail()}")
                summaries.append(json.loads((workdir / f"agent-{i}.json").read_text()))
            produced = sum(s["outbox"]["results_produced"] for s in summaries)
            deadline = time.monotonic() + RESULTS_SETTLE_TIMEOUT_S
            while at_hub < produced and time.monotonic() < deadline:
                time.sleep(POLL_S)
                at_hub = hub_api.get("/v1/results/count")["count"]
            records = _fetch_results(hub_api)
            report = _report(o, broker, x, y, records, produced, at_hub, summaries)
            if o.secure is not None:
                report["broker"] = f"mosquitto, confined ({o.secure}, TLS)"
            if update is not None:
                report["update"] = update.summary(records)
        report["seconds"] = round(time.monotonic() - t_start, 1)
        report["workdir"] = str(workdir) if o.keep or o.workdir else None
        return report


def _secure_fleet(group: ProcessGroup, workdir: Path, o: DemoOptions
                  ) -> tuple[RunningBroker, dict[str, str], list[dict[str, TomlValue] | None]]:
    """A fleet CA and identities in workdir/pki, the confined broker, the hub's settings and
    each agent's [mqtt] table, as `fleet pki init` and `fleet devices enroll` write them."""

    from fleet.identity.pki import Pki
    from fleet.lab.brokers import mosquitto_path, start_confined_broker

    if o.secure not in ("mtls", "password"):
        raise FleetError(f"--secure {o.secure!r}: choose mtls or password")
    if not mosquitto_path():
        raise FleetError("--secure needs Mosquitto (apt-get install mosquitto): the embedded "
                         "broker has no TLS or access rules")
    pki = Pki.init(workdir / "pki")
    for i in range(o.devices):
        pki.enroll(f"demo-{i}")
    broker = start_confined_broker(group, pki, o.secure)  # type: ignore[arg-type]
    return broker, pki.hub_env(), [pki.device_mqtt(f"demo-{i}") for i in range(o.devices)]


class _Update:
    """A new version of the edge model (the same weights, version 2, signed with the demo key),
    pushed to the hub and assigned to each demo device once the hub has heard from it."""

    def __init__(self, hub: HubClient, workdir: Path) -> None:
        from fleet.contract.bundle import pack_bundle
        from fleet.lab.bundle_copy import copy_bundle

        self.hub = hub
        bundle = copy_bundle(EDGE_BUNDLE, workdir / "digits-edge-2", version=2, key=DEMO_KEY)
        try:
            r = self.hub.post("/v1/models", content=pack_bundle(bundle))
        except HubClientError as exc:
            raise FleetError(f"the hub refused the demo's model update: {exc}") from None
        self.ref = f"{r['name']}@{r['version']}"
        self.assigned: set[str] = set()

    def poll(self) -> None:
        for d in self.hub.get("/v1/devices"):
            if d["id"].startswith("demo-") and d["id"] not in self.assigned:
                try:
                    self.hub.put(f"/v1/devices/{d['id']}/desired",
                                 json={"model": "digits-edge", "version": 2})
                except HubClientError as exc:
                    log.debug("assignment of %s not taken yet: %s", d["id"], exc)
                    continue
                self.assigned.add(d["id"])

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        devices = self.hub.get("/v1/devices")
        by_model: dict[str, int] = {}
        for r in records:
            by_model[r["model"]] = by_model.get(r["model"], 0) + 1
        return {"to": self.ref, "devices_assigned": len(self.assigned),
                "devices_updated": sum(1 for d in devices if d["model"] == self.ref),
                "results_by_model": dict(sorted(by_model.items()))}


def _follow(hub: HubClient, agents: list[ManagedProcess], n: int, progress: Progress | None,
            update: _Update | None = None) -> int:
    at_hub = 0
    while True:
        if update is not None:
            try:
                update.poll()
            except Exception as exc:  # the hub may be busy; the next poll will tell
                log.debug("update poll failed: %s", exc)
        try:
            at_hub = hub.get("/v1/results/count")["count"]
        except Exception as exc:  # the hub may be busy; the next poll will tell
            log.debug("stats poll failed: %s", exc)
        if progress:
            progress(at_hub, n)
        if all(not a.running() for a in agents):
            return at_hub
        time.sleep(POLL_S)


def _fetch_results(hub: HubClient) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = 0
    while True:
        page = hub.get("/v1/results", limit=1000, cursor=cursor)
        out.extend(page["items"])
        if page["next_cursor"] is None:
            return out
        cursor = page["next_cursor"]


def offline_accuracy(x: np.ndarray, y: np.ndarray, bundle: Path, backend: str) -> float:
    """Accuracy of one bundle run over every input of the stream."""
    from fleet.inference.engine import Engine

    eng = Engine.open(bundle, backend)
    try:
        probs = eng.predict_batch(x)
    finally:
        eng.close()
    return float((probs.argmax(axis=1) == y).mean())


# A representative wall-clock time, so that the figure does not vary from run to run with the
# number of digits the current time prints with.
_SENT_AT = 1_764_000_000.123456


def cloud_only_bytes(x: np.ndarray, model_ref: str, deadline_ms: float) -> int:
    """What a cloud-only deployment sends: every input as an offload message."""
    return sum(len(Offload(id="0" * 32, model=model_ref, input=xi, deadline_ms=deadline_ms,
                           sent_at=_SENT_AT, edge_label=0, edge_score=0.0).encode())
               for xi in x)


def _wire_bytes(x: np.ndarray, summaries: list[dict[str, Any]], broker: RunningBroker,
                edge_ref: str, o: DemoOptions) -> dict[str, Any]:
    """Every byte on the devices' links to the broker (MQTT packets with their framing:
    offloads, answers, result batches, acks, telemetry, status, assignments, pings; TLS records
    in a secure run), as the kernel counted them on each agent's connection, per input; and
    what the same stream costs a device that sends every input to the cloud."""
    from fleet.contract.bundle import load_bundle

    counted = [s.get("mqtt_bytes") for s in summaries]
    known = all(isinstance(c, dict) for c in counted) and bool(counted)
    sent = sum(c["sent"] for c in counted if isinstance(c, dict)) if known else None
    received = sum(c["received"] for c in counted if isinstance(c, dict)) if known else None
    total = sent + received if sent is not None and received is not None else None
    cloud_ref = load_bundle(CLOUD_BUNDLE, verify_files=False).manifest.ref
    return {
        "total": total, "sent": sent, "received": received,
        "per_input": round(total / len(x), 1) if total is not None else None,
        "cloud_only_per_input": round(cloud_only_bytes_per_input(
            x, "demo-0", edge_ref, cloud_ref, o.deadline_ms, broker.protocol), 1),
        "counted": "kernel TCP_INFO on each agent's broker connection" if known else
                   "not counted: this system does not report TCP_INFO",
    }


def _report(o: DemoOptions, broker: RunningBroker, x: np.ndarray, y: np.ndarray,
            records: list[dict[str, Any]], produced: int, at_hub: int,
            summaries: list[dict[str, Any]]) -> dict[str, Any]:
    from fleet.contract.bundle import load_bundle

    stream_tag = f"{o.stream}:"
    answered: dict[int, int] = {}
    for r in records:
        ref = r.get("input_ref") or ""
        if ref.startswith(stream_tag):
            answered[int(ref[len(stream_tag):])] = r["final_label"]
    hybrid_ok = sum(1 for i, lab in answered.items() if i < len(y) and lab == y[i])
    local = [r["latency_ms"] for r in records if not r["offloaded"]]
    offl = [r["latency_ms"] for r in records if r["offloaded"]]
    edge_ref = load_bundle(EDGE_BUNDLE, verify_files=False).manifest.ref
    backend = summaries[0]["backend"] if summaries else o.backend
    edge_manifest = load_bundle(EDGE_BUNDLE, verify_files=False).manifest
    fidelity = [s.get("fidelity") or {} for s in summaries]
    return {
        "samples": len(y),
        "devices": o.devices,
        "stream": o.stream,
        "policy": summaries[0]["policy"] if summaries else o.policy,
        "threshold": summaries[0]["threshold"] if summaries else o.threshold,
        "backend": backend,
        "edge_accuracy": round(offline_accuracy(x, y, EDGE_BUNDLE, backend), 4),
        "cloud_accuracy": round(offline_accuracy(x, y, CLOUD_BUNDLE, "onnxruntime"), 4),
        "hybrid_accuracy": round(hybrid_ok / len(y), 4),
        "hybrid_answered": len(answered),
        "offload_rate": round(len(offl) / len(records), 4) if records else 0.0,
        "degraded": sum(1 for r in records if r["degraded"]),
        "bytes_offloaded": int(sum(r["offload_bytes"] for r in records)),
        "bytes_cloud_only": cloud_only_bytes(x, edge_ref, o.deadline_ms),
        "wire_bytes": _wire_bytes(x, summaries, broker, edge_ref, o),
        "latency_ms": {"local_p50": percentile(local, 50), "local_p99": percentile(local, 99),
                       "offload_p50": percentile(offl, 50), "offload_p99": percentile(offl, 99)},
        "results_produced": produced,
        "results_at_hub": at_hub,
        "broker": broker.kind,
        "manifest_accuracy": edge_manifest.metrics.get("accuracy", {}).get(o.stream),
        "offload_budget": (edge_manifest.fidelity.offload_budget
                           if edge_manifest.fidelity else None),
        "offload_mode": o.offload,
        "fidelity": {"agreement": min((f["agreement"] for f in fidelity if "agreement" in f),
                                      default=None),
                     "min_agreement": (edge_manifest.fidelity.min_agreement
                                       if edge_manifest.fidelity else None),
                     "backends": sorted({str(f.get("backend")) for f in fidelity if f}),
                     "refused": sorted({f"{b}: {why}" for f in fidelity
                                        for b, why in (f.get("refused") or {}).items()})},
    }


def gap_recovered(r: dict[str, Any]) -> float | None:
    gap = r["cloud_accuracy"] - r["edge_accuracy"]
    return (r["hybrid_accuracy"] - r["edge_accuracy"]) / gap if gap > 0 else None


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v * 100:.2f}%" if pct else f"{v:.3f}"


def _wire_row(w: dict[str, Any]) -> str:
    if w.get("per_input") is None:
        return f"not counted / {w.get('cloud_only_per_input')}"
    return (f"{w['per_input']:,.1f} / {w['cloud_only_per_input']:,.1f} "
            f"({w['per_input'] / w['cloud_only_per_input']:.0%}; {w['total']:,} bytes on the "
            "devices' links)")


def _fidelity_row(f: dict[str, Any]) -> str:
    text = (f"{f['agreement'] * 100:.2f}% agreement on {', '.join(f['backends'])} "
            f"(floor {f['min_agreement'] * 100:.1f}%)")
    return text + (f"; refused {'; '.join(f['refused'])}" if f.get("refused") else "")


def _update_row(u: dict[str, Any]) -> str:
    models = ", ".join(f"{k} {v}" for k, v in u["results_by_model"].items())
    return (f"{u['to']} on {u['devices_updated']}/{u['devices_assigned']} devices "
            f"(answers: {models})")


def report_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    lat = r["latency_ms"]
    rec = gap_recovered(r)
    return [
        ("samples / devices", f"{r['samples']} / {r['devices']} ({r['stream']} stream)"),
        ("broker", r["broker"]),
        ("policy (threshold)", f"{r['policy']} ({r['threshold']:.6g})"),
        ("edge-only accuracy", _fmt(r["edge_accuracy"], True)
         + (f"  (manifest {_fmt(r['manifest_accuracy'], True)})"
            if r.get("manifest_accuracy") is not None else "")),
        *([("fidelity on this CPU", _fidelity_row(r["fidelity"]))]
          if r.get("fidelity", {}).get("agreement") is not None else []),
        ("cloud-only accuracy", _fmt(r["cloud_accuracy"], True)),
        ("hybrid accuracy", f"{_fmt(r['hybrid_accuracy'], True)}"
                            + (f"  ({rec * 100:.0f}% of the edge-cloud gap)" if rec else "")),
        ("offload rate", _fmt(r["offload_rate"], True)
         + (f"  ({r['offload_mode']}; bundle budget {_fmt(r['offload_budget'], True)})"
            if r.get("offload_budget") is not None else "")),
        ("wire bytes per input / cloud-only", _wire_row(r.get("wire_bytes") or {})),
        ("bytes offloaded / cloud-only", f"{r['bytes_offloaded']:,} / {r['bytes_cloud_only']:,} "
                                         f"({r['bytes_offloaded'] / r['bytes_cloud_only']:.1%})"),
        ("latency local p50 / p99 (ms)", f"{_fmt(lat['local_p50'])} / {_fmt(lat['local_p99'])}"),
        ("latency offloaded p50 / p99 (ms)",
         f"{_fmt(lat['offload_p50'])} / {_fmt(lat['offload_p99'])}"),
        ("degraded answers", str(r["degraded"])),
        ("results at hub / produced", f"{r['results_at_hub']} / {r['results_produced']}"),
        *([("model update", _update_row(r["update"]))] if r.get("update") else []),
        ("wall time", f"{r['seconds']} s"),
    ]


__all__ = ["DemoOptions", "report_rows", "run_demo"]
