"""Agent and hub talking through a real broker: Mosquitto and the embedded one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_hub.bridge import Bridge
from cloud_hub.db import Result, init_db, make_engine, session_factory
from cloud_hub.metrics import HubMetrics
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from fleet.contract import protocol as p
from fleet.inference.engine import Engine
from fleet.lab.brokers import RunningBroker
from fleet.transport.mqtt import MqttConfig, MqttSession
from models import CLOUD_BUNDLE, EDGE_BUNDLE, STREAMS_FILE

CONNECT_S = 10.0


@pytest.fixture
def hub(broker: RunningBroker, tmp_path: Path) -> Iterator[Bridge]:
    eng = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    init_db(eng)
    bridge = Bridge(Engine.open(CLOUD_BUNDLE, "onnxruntime"), session_factory(eng), HubMetrics(),
                    batch_max=32, batch_wait_ms=0, offload_queue=1000, ingest_queue=1000,
                    mqtt=MqttConfig(port=broker.port, protocol=broker.protocol,
                                    client_id=f"hub-{tmp_path.name}"))
    bridge.start()
    assert bridge.transport.wait_connected(CONNECT_S)
    yield bridge
    bridge.stop()
    eng.dispose()


# An offload deadline no answer misses on a loaded 2-core machine (answers take milliseconds).
DEADLINE_MS = 10_000.0


def _agent(broker: RunningBroker, device: str, **kw: Any) -> Agent:
    s = AgentSettings(device_id=device, bundle=EDGE_BUNDLE, telemetry_interval_s=0.5,
                      mqtt={"port": broker.port, "protocol": broker.protocol},
                      results={"flush_interval_s": 0.02}, **kw)
    a = Agent(s)
    a.start(wait_connected_s=CONNECT_S)
    assert a.transport.connected
    return a


def _count(bridge: Bridge) -> int:
    from sqlalchemy import func, select

    with bridge.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Result)) or 0)


@pytest.mark.mosquitto
def test_two_agents_offload_and_deliver_every_result(broker: RunningBroker, hub: Bridge) -> None:
    # A subscription right after CONNACK can race the first publish on some brokers.
    time.sleep(0.2)
    data = np.load(STREAMS_FILE)
    x, y = data["mixed_x"][:120], data["mixed_y"][:120]
    # The deadline is far beyond any answer time, even on a loaded machine: this test is about
    # every offload reaching the hub and back and every result arriving once, not latency.
    agents = [_agent(broker, f"it-{broker.kind}-{i}", offload={"deadline_ms": DEADLINE_MS})
              for i in range(2)]
    try:
        answers = []
        for i, xi in enumerate(x):
            answers.append(agents[i % 2].infer(xi, input_ref=f"mixed:{i}"))
        for a in agents:
            a.sender.flush()
            assert a.drain(15.0), f"{a.device}: {len(a.outbox)} results unacknowledged"
    finally:
        for a in agents:
            a.stop()
    offloaded = [a for a in answers if a.offloaded]
    assert offloaded, "the fitted threshold should offload some of the mixed stream"
    assert all(a.source == "cloud" for a in offloaded), "every offload answered in time"
    hybrid = np.mean([a.label == yi for a, yi in zip(answers, y, strict=True)])
    assert hybrid >= 0.9
    assert _count(hub) == 120
    with hub.sessions() as s:
        from sqlalchemy import select
        refs = set(s.scalars(select(Result.input_ref)))
    assert refs == {f"mixed:{i}" for i in range(120)}


@pytest.mark.mosquitto
def test_status_and_last_will(broker: RunningBroker, hub: Bridge) -> None:
    from cloud_hub.db import Device

    time.sleep(0.2)
    dev = f"will-{broker.kind}"
    a = _agent(broker, dev)

    def online() -> bool | None:
        with hub.sessions() as s:
            d = s.get(Device, dev)
            return None if d is None else d.online and d.telemetry is not None

    deadline = time.monotonic() + 5
    while not online() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert online()
    # Vanish without a DISCONNECT: the broker publishes the last will (offline).
    session = a.transport
    assert isinstance(session, MqttSession)
    session.abort()
    deadline = time.monotonic() + 10
    while online() and time.monotonic() < deadline:
        time.sleep(0.05)
    a._stop.set()
    a.outbox.close()
    assert online() is False, "the broker published the last will: offline"


@pytest.mark.mosquitto
def test_answers_only_reach_their_device(broker: RunningBroker, hub: Bridge) -> None:
    time.sleep(0.2)
    seen: list[str] = []
    spy = MqttSession(MqttConfig(port=broker.port, protocol=broker.protocol, client_id="spy"),
                      lambda t, b: seen.append(t), [("ehi/v1/+/answer", 1)])
    spy.start()
    assert spy.wait_connected(CONNECT_S)
    a = _agent(broker, f"solo-{broker.kind}")
    try:
        hard = np.random.default_rng(0).uniform(0, 16, (8, 8)).astype(np.float32)
        ans = a.infer(hard, deadline_ms=2000)
        assert ans.offloaded and ans.source == "cloud"
    finally:
        a.stop()
        time.sleep(0.1)
        spy.stop()
    assert seen == [p.topic(f"solo-{broker.kind}", p.Channel.ANSWER)]
