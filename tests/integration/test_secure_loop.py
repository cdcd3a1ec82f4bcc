"""The loop on a confined broker: an agent and the hub with the credentials and settings
`fleet pki` wrote for them (client certificates, or passwords over TLS) answer offloads and
deliver every result; a device whose credentials are not the fleet's does not get on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud_hub.bridge import Bridge
from cloud_hub.core.config import HubMqtt
from cloud_hub.db import init_db, make_engine, session_factory
from cloud_hub.metrics import HubMetrics
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from fleet.identity.pki import Pki
from fleet.inference.model import Model
from fleet.lab.brokers import mosquitto_path, start_confined_broker
from fleet.lab.processes import ProcessGroup
from fleet.transport.mqtt import TransportError
from models import CLOUD_BUNDLE, EDGE_BUNDLE
from tests.conftest import need, wait_until

HARD = np.random.default_rng(0).uniform(0, 16, (8, 8)).astype(np.float32)


@pytest.mark.parametrize("mode", ["mtls", "password"])
def test_agent_and_hub_on_a_confined_broker(mode: str, tmp_path: Path) -> None:
    need(mosquitto_path() is not None, "mosquitto is not installed")
    pki = Pki.init(tmp_path / "pki")
    pki.enroll("secure-1")
    with ProcessGroup() as group:
        broker = start_confined_broker(group, pki, mode)  # type: ignore[arg-type]
        env = pki.hub_env()
        tls = {"ca_file": env["EHI_HUB_MQTT__TLS__CA_FILE"]}
        if mode == "mtls":
            tls |= {"cert_file": env["EHI_HUB_MQTT__TLS__CERT_FILE"],
                    "key_file": env["EHI_HUB_MQTT__TLS__KEY_FILE"]}
        hub_mqtt = HubMqtt(port=broker.port, username=env["EHI_HUB_MQTT__USERNAME"],
                           password_file=env.get("EHI_HUB_MQTT__PASSWORD_FILE"), tls=tls,
                           share_group=env["EHI_HUB_MQTT__SHARE_GROUP"])
        eng = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
        init_db(eng)
        hub = Bridge(Model.open(CLOUD_BUNDLE, "onnxruntime"), session_factory(eng), HubMetrics(),
                     batch_max=8, batch_wait_ms=0, offload_queue=100, ingest_queue=100,
                     mqtt=hub_mqtt.session_config("cloud-hub-hub-0"),
                     share_group=hub_mqtt.share_group)
        hub.start()
        # The [mqtt] table `fleet devices enroll` wrote for the device, as it is.
        mqtt = pki.device_mqtt("secure-1")
        assert mqtt["port"] == broker.port
        agent = Agent(AgentSettings(device_id="secure-1", bundle=EDGE_BUNDLE,
                                    telemetry_interval_s=60, mqtt=mqtt,
                                    results={"flush_interval_s": 0.05}))
        agent.start(wait_connected_s=10)
        try:
            assert hub.transport.wait_connected(10) and agent.transport.connected
            assert wait_until(lambda: agent.infer(HARD, deadline_ms=2000).source == "cloud", 30)
            for _ in range(5):
                agent.infer(HARD, deadline_ms=2000)
            assert agent.drain(15), f"{len(agent.outbox)} results unacknowledged"
        finally:
            agent.stop()
            hub.stop()
            eng.dispose()


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    pki = Pki.init(tmp_path / "pki")
    folder = pki.enroll("loose").folder
    (folder / "client.key").chmod(0o644)
    mqtt = pki.device_mqtt("loose")
    settings = AgentSettings(device_id="loose", bundle=EDGE_BUNDLE, mqtt=mqtt)
    with pytest.raises(TransportError, match="readable by others"):
        settings.mqtt.session_config("agent-loose")
