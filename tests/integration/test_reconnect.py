"""Agent and hub survive their broker going away and coming back (their own broker)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from cloud_hub.bridge import Bridge
from cloud_hub.db import init_db, make_engine, session_factory
from cloud_hub.metrics import HubMetrics
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from fleet.inference.engine import Engine
from fleet.lab.brokers import start_broker
from fleet.lab.processes import ProcessGroup
from fleet.transport.mqtt import MqttConfig
from models import CLOUD_BUNDLE, EDGE_BUNDLE

HARD = np.random.default_rng(0).uniform(0, 16, (8, 8)).astype(np.float32)



@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
def test_agent_and_hub_reconnect_after_a_broker_restart(kind: str, tmp_path: Path) -> None:
    from fleet.lab.brokers import mosquitto_path
    from tests.conftest import need, wait_until

    if kind == "mosquitto":
        need(mosquitto_path() is not None, "mosquitto is not installed")
    with ProcessGroup() as group:
        broker = start_broker(group, tmp_path, kind)
        eng = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
        init_db(eng)
        hub = Bridge(Engine.open(CLOUD_BUNDLE, "onnxruntime"), session_factory(eng), HubMetrics(),
                     batch_max=8, batch_wait_ms=0, offload_queue=100, ingest_queue=100,
                     mqtt=MqttConfig(port=broker.port, protocol=broker.protocol,
                                     client_id="hub-reconnect"))
        hub.start()
        agent = Agent(AgentSettings(device_id="recon", bundle=EDGE_BUNDLE, telemetry_interval_s=60,
                                    mqtt={"port": broker.port, "protocol": broker.protocol},
                                    results={"flush_interval_s": 0.05}))
        agent.start(wait_connected_s=10)
        try:
            assert hub.transport.wait_connected(10)
            time.sleep(0.2)
            assert agent.infer(HARD, deadline_ms=2000).source == "cloud"

            broker.process.stop()
            assert wait_until(lambda: not agent.transport.connected, 10)
            during = agent.infer(HARD, deadline_ms=2000)
            assert during.source == "edge_fallback" and during.degraded  # answered at once

            start_broker(group, tmp_path, kind, port=broker.port)
            assert wait_until(lambda: agent.transport.connected and hub.transport.connected, 30)
            time.sleep(0.3)  # the re-subscriptions land
            assert agent.infer(HARD, deadline_ms=2000).source == "cloud"
            # Results produced while the broker was away reach the hub after the reconnect.
            assert agent.drain(15), f"{len(agent.outbox)} results unacknowledged"
            assert agent.outbox.acked == 3
        finally:
            agent.stop()
            hub.stop()
            eng.dispose()
