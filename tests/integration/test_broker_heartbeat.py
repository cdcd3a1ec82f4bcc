"""A hub that hears nothing from its broker says so and reconnects: its own heartbeat through the
broker stops coming back (here: the broker process is frozen with SIGSTOP, its TCP connections
stay open and nothing is delivered), /readyz turns not ready, and when the broker answers again
the hub is ready again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from cloud_hub.bridge import DEAF_AFTER_HEARTBEATS, Bridge
from cloud_hub.db import init_db, make_engine, session_factory
from cloud_hub.metrics import HubMetrics
from fleet.inference.model import Model
from fleet.lab.brokers import mosquitto_path, start_broker
from fleet.lab.processes import ProcessGroup
from fleet.transport.mqtt import MqttConfig
from models import CLOUD_BUNDLE
from tests.conftest import need, wait_until

HEARTBEAT_S = 0.2


def test_a_deaf_hub_notices_reports_and_recovers(tmp_path: Path) -> None:
    need(mosquitto_path() is not None, "mosquitto is not installed")
    with ProcessGroup() as group:
        broker = start_broker(group, tmp_path, "mosquitto")
        eng = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
        init_db(eng)
        metrics = HubMetrics()
        hub = Bridge(Model.open(CLOUD_BUNDLE, "onnxruntime"), session_factory(eng), metrics,
                     batch_max=8, batch_wait_ms=0, offload_queue=100, ingest_queue=100,
                     mqtt=MqttConfig(port=broker.port, protocol=broker.protocol,
                                     client_id="hub-heartbeat"),
                     replica="hub-heartbeat", heartbeat_s=HEARTBEAT_S)
        hub.start()
        try:
            assert hub.transport.wait_connected(10)
            # Its own heartbeats come back: never deaf while the broker works.
            assert wait_until(lambda: hub.silence_s < HEARTBEAT_S * 2 and not hub.deaf, 30)
            os.kill(broker.process.pid, signal.SIGSTOP)
            try:
                limit = HEARTBEAT_S * DEAF_AFTER_HEARTBEATS
                assert wait_until(lambda: hub.deaf, limit + 20), hub.silence_s
                assert metrics.broker_deaf._value.get() >= 1
            finally:
                os.kill(broker.process.pid, signal.SIGCONT)
            # The broker answers again: the hub reconnects and hears its heartbeat.
            assert wait_until(lambda: hub.connected and not hub.deaf, 60), hub.silence_s
        finally:
            hub.stop()
