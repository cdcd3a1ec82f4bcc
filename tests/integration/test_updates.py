"""Model updates end to end: hub (API and bridge) and agents through a real Mosquitto."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cloud_hub.db import Device
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from fleet.contract import protocol as p
from fleet.contract.assignment import rollback_directive
from fleet.contract.signing import PrivateKey
from fleet.lab.brokers import RunningBroker
from fleet.transport.mqtt import MqttConfig, MqttSession
from models import EDGE_BUNDLE, STREAMS_FILE
from tests.conftest import wait_until
from tests.updates import HubServer, UpdateKit, hub_settings

CONNECT_S = 10.0
UPDATE_S = 30.0


@pytest.fixture
def hub(mosquitto: RunningBroker, kit: UpdateKit, tmp_path: Path) -> Iterator[HubServer]:
    s = hub_settings(tmp_path / "hub", kit, mqtt={"port": mosquitto.port, "shared": False},
                     replica_id=f"hub-{tmp_path.name}")
    with HubServer(s, with_bridge=True) as h:
        assert h.app.state.bridge.transport.wait_connected(CONNECT_S)
        for v in (2, 3):
            assert h.push(kit.version(v)).status_code == 201
        yield h


def _agent(broker: RunningBroker, kit: UpdateKit, hub: HubServer, device: str) -> Agent:
    s = AgentSettings(device_id=device, bundle=EDGE_BUNDLE, backend="onnxruntime",
                      telemetry_interval_s=60,
                      mqtt={"port": broker.port}, local_api={"port": -1},
                      update=kit.update_settings(hub.url))
    a = Agent(s)
    a.start(wait_connected_s=CONNECT_S)
    return a


def _device(hub: HubServer, device: str) -> Device | None:
    with hub.app.state.sessions() as s:
        d: Device | None = s.get(Device, device)
        return d


def _assign(hub: HubServer, device: str, version: int) -> httpx.Response:
    return httpx.put(f"{hub.url}/v1/devices/{device}/desired",
                     json={"model": "digits-edge", "version": version}, timeout=10)


def _reported(hub: HubServer, device: str, **want: Any) -> bool:
    d = _device(hub, device)
    return d is not None and all(getattr(d, k) == v for k, v in want.items())


@pytest.mark.mosquitto
def test_assign_update_report_and_offline_pickup(mosquitto: RunningBroker, kit: UpdateKit,
                                                 hub: HubServer) -> None:
    a = _agent(mosquitto, kit, hub, "upd-1")
    x = np.load(STREAMS_FILE)["clean_x"]
    try:
        assert wait_until(lambda: _device(hub, "upd-1") is not None, CONNECT_S)
        r = _assign(hub, "upd-1", 2)
        assert r.status_code == 200 and r.json()["published"], r.text
        assert wait_until(lambda: a.model_ref == "digits-edge@2", UPDATE_S)
        assert wait_until(lambda: _reported(hub, "upd-1", model="digits-edge@2",
                                            update_state="idle"), CONNECT_S)
        assert a.infer(x[0]).label >= 0
    finally:
        a.stop()
    # While the device is away its assignment changes; it picks it up when it returns.
    assert _assign(hub, "upd-1", 3).status_code == 200
    back = _agent(mosquitto, kit, hub, "upd-1")
    try:
        assert wait_until(lambda: back.model_ref == "digits-edge@3", UPDATE_S)
        assert wait_until(lambda: _reported(hub, "upd-1", model="digits-edge@3"), CONNECT_S)
    finally:
        back.stop()


@pytest.mark.mosquitto
def test_replayed_assignment_and_rollback_rules(mosquitto: RunningBroker, kit: UpdateKit,
                                                hub: HubServer) -> None:
    a = _agent(mosquitto, kit, hub, "upd-2")
    got: list[bytes] = []
    spy = MqttSession(MqttConfig(port=mosquitto.port, client_id="spy-upd-2"),
                      lambda t, b: got.append(b), [(p.topic("upd-2", p.Channel.DESIRED), 1)])
    spy.start()
    try:
        assert spy.wait_connected(CONNECT_S)
        assert wait_until(lambda: _device(hub, "upd-2") is not None, CONNECT_S)
        assert _assign(hub, "upd-2", 2).status_code == 200
        assert wait_until(lambda: a.model_ref == "digits-edge@2", UPDATE_S)
        assert wait_until(lambda: len(got) >= 1, CONNECT_S)
        old = got[-1]
        assert _assign(hub, "upd-2", 3).status_code == 200
        assert wait_until(lambda: a.model_ref == "digits-edge@3", UPDATE_S)
        # An attacker with broker access replays the old (validly signed) assignment.
        spy.publish(p.topic("upd-2", p.Channel.DESIRED), old, qos=1, retain=True)
        assert wait_until(lambda: _reported(hub, "upd-2", update_state="refused",
                                            update_code="replay"), CONNECT_S)
        assert a.model_ref == "digits-edge@3"
        # Going back needs a signed rollback directive; the hub says so.
        r = _assign(hub, "upd-2", 2)
        assert r.status_code == 409 and "rollback directive" in r.json()["detail"]
        d = rollback_directive("digits-edge", 3, 2, datetime.now(UTC) + timedelta(days=1),
                               PrivateKey.read(kit.key))
        assert httpx.post(f"{hub.url}/v1/models/digits-edge/rollbacks", json=d,
                          timeout=10).status_code == 201
        assert _assign(hub, "upd-2", 2).status_code == 200
        assert wait_until(lambda: a.model_ref == "digits-edge@2", UPDATE_S)
        assert wait_until(lambda: _reported(hub, "upd-2", model="digits-edge@2",
                                            update_state="idle"), CONNECT_S)
    finally:
        spy.stop()
        a.stop()


@pytest.mark.mosquitto
def test_unknown_device_and_model_get_clear_errors(hub: HubServer) -> None:
    r = _assign(hub, "never-seen", 2)
    assert r.status_code == 404 and "unknown device" in r.json()["detail"]


@pytest.mark.mosquitto
def test_fidelity_figures_reach_the_hub_and_the_hub_sets_the_offload_budget(
        mosquitto: RunningBroker, kit: UpdateKit, hub: HubServer) -> None:
    a = _agent(mosquitto, kit, hub, "upd-fid")
    x = np.load(STREAMS_FILE)["shifted_x"]
    try:
        # The reported state carries the fidelity check of the model on its backend.
        assert wait_until(lambda: (d := _device(hub, "upd-fid")) is not None
                          and d.fidelity is not None, CONNECT_S)
        d = httpx.get(f"{hub.url}/v1/devices/upd-fid", timeout=10).json()
        f = d["fidelity"]
        assert f["bundle"] == "digits-edge@1" and f["backend"] == "onnxruntime"
        assert f["faithful"] and f["agreement"] >= f["min_agreement"] == 0.995
        assert f["threshold_source"] == "calibrated" and f["calibrated_threshold"] > 0
        # The device runs a factory bundle the registry does not hold: assign one first.
        r = httpx.put(f"{hub.url}/v1/devices/upd-fid/offload",
                      json={"mode": "budget", "target": 0.3}, timeout=10)
        assert r.status_code == 409 and "registry" in r.json()["detail"]
        assert _assign(hub, "upd-fid", 2).status_code == 200
        assert wait_until(lambda: a.model_ref == "digits-edge@2", UPDATE_S)
        r = httpx.put(f"{hub.url}/v1/devices/upd-fid/offload",
                      json={"mode": "budget", "target": 0.3}, timeout=10)
        assert r.status_code == 200, r.text
        assert wait_until(lambda: a.offload_state()["mode"] == "budget", CONNECT_S)
        assert a.offload_state()["target"] == 0.3
        for xi in x[:300]:
            a.infer(xi)
        st = a.offload_state()
        assert abs(st["recent_rate"] - 0.3) <= 0.06, st
        a.publish_telemetry()
        assert wait_until(lambda: ((d := _device(hub, "upd-fid")) is not None
                                   and (d.offload or {}).get("mode") == "budget"), CONNECT_S)
        d = httpx.get(f"{hub.url}/v1/devices/upd-fid", timeout=10).json()
        assert d["offload_setting"] == {"mode": "budget", "target": 0.3, "max_bytes_per_s": None}
        stats = httpx.get(f"{hub.url}/v1/stats", timeout=10).json()
        assert [r["device"] for r in stats["offload"]["devices"]] == ["upd-fid"]
        metrics = httpx.get(f"{hub.url}/metrics", timeout=10).text
        assert 'ehi_device_offload{device="upd-fid",figure="target"} 0.3' in metrics
        # Taken back: the agent's own settings (a fixed threshold) again.
        assert httpx.delete(f"{hub.url}/v1/devices/upd-fid/offload",
                            timeout=10).status_code == 200
        assert wait_until(lambda: a.offload_state()["mode"] == "threshold", CONNECT_S)
    finally:
        a.stop()
