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
from fleet import protocol as p
from fleet.assignment import rollback_directive
from fleet.brokers import RunningBroker
from fleet.mqtt import MqttConfig, MqttSession
from fleet.signing import PrivateKey
from models import STREAMS_FILE
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
    s = AgentSettings(device_id=device, backend="onnxruntime", telemetry_interval_s=60,
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
