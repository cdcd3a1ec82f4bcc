"""A hub split by role into two processes on one database and one broker: one answers the
offloads, the other stores everything else. Every hard input is answered by the cloud model
in the answering process, every result is stored once by the storing one, and neither takes
the other's messages."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from cloud_hub.core.config import HubSettings
from cloud_hub.roles import parse_roles
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from fleet.lab.brokers import mosquitto_path, start_broker
from fleet.lab.processes import ProcessGroup, migrate_hub_database, start_hub
from fleet.transport.ports import free_port
from models import EDGE_BUNDLE
from tests.conftest import need, wait_until


def _metric(url: str, name: str, label: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf'^{name}\{{{label}\}} (\S+)', text, re.M))


def test_answer_and_store_roles_in_two_processes(database_url: str, tmp_path: Path) -> None:
    need(mosquitto_path() is not None, "mosquitto is not installed")
    migrate_hub_database(database_url)
    with ProcessGroup() as group:
        broker = start_broker(group, tmp_path, "mosquitto")
        urls = {}
        for role in ("answer", "store"):
            port = free_port()
            (tmp_path / role).mkdir()
            proc = start_hub(group, tmp_path / role, port=port, broker_port=broker.port,
                             log_path=tmp_path / f"{role}.log", database_url=database_url,
                             env={"EHI_HUB_MIGRATE_ON_START": "false",
                                  "EHI_HUB_REPLICA_ID": f"hub-{role}", "EHI_HUB_ROLES": role})
            urls[role] = f"http://127.0.0.1:{port}"
            assert wait_until(lambda u=urls[role]: httpx.get(  # type: ignore[misc]
                f"{u}/readyz", timeout=5).status_code == 200, 60), proc.tail()
        agents = [Agent(AgentSettings(device_id=f"role-{i}", bundle=EDGE_BUNDLE,
                                      telemetry_interval_s=0.2,
                                      mqtt={"port": broker.port, "protocol": "5"},
                                      results={"flush_interval_s": 0.05, "store": "memory"}))
                  for i in range(2)]
        for a in agents:
            a.start(wait_connected_s=10)
        try:
            time.sleep(0.5)  # both processes' subscriptions are in place
            rng = np.random.default_rng(3)
            answers = [a.infer(rng.uniform(0, 16, (8, 8)).astype(np.float32), deadline_ms=2000)
                       for _ in range(30) for a in agents]
            hard = [x for x in answers if x.offloaded]
            assert hard and all(x.source == "cloud" for x in hard)
            for a in agents:
                assert a.drain(30), f"{len(a.outbox)} results not acknowledged"
            count = httpx.get(f"{urls['store']}/v1/results/count", timeout=10).json()["count"]
            assert count == len(answers)
            ans, sto = urls["answer"], urls["store"]
            answered = 'outcome="answered"'
            assert _metric(ans, "ehi_hub_offloads_answered_total", answered) == len(hard)
            assert _metric(sto, "ehi_hub_offloads_answered_total", answered) == 0
            assert _metric(ans, "ehi_hub_messages_total", 'channel="results"') == 0
            assert _metric(sto, "ehi_hub_messages_total", 'channel="offload"') == 0
            assert wait_until(lambda: _metric(sto, "ehi_hub_messages_total",
                                              'channel="telemetry"') > 0, 10)
            devices = httpx.get(f"{sto}/v1/devices", timeout=10).json()
            assert {d["id"] for d in devices} >= {"role-0", "role-1"}
        finally:
            for a in agents:
                a.stop()


def test_unknown_roles_are_refused() -> None:
    assert parse_roles(" store , answer") == frozenset({"answer", "store"})
    for bad in ("", "answer,cook", ","):
        with pytest.raises(ValueError, match="one or more of"):
            parse_roles(bad)
    with pytest.raises(ValidationError, match="one or more of"):
        HubSettings(roles="answer,cook")
    assert HubSettings().role_set() == frozenset({"answer", "store"})
