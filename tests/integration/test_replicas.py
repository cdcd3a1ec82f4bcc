"""Two hub processes on one database and one broker, as the k3s manifests run them: the
migration once, both replicas answer offloads, every result is stored once, a bundle uploaded
to one is served by the other (the database artifact store), and a replica stopped with
SIGTERM leaves and exits within its grace period while the other carries on, losing nothing."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np

from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from fleet.contract.bundle import pack_bundle
from fleet.lab.brokers import mosquitto_path, start_broker
from fleet.lab.processes import ProcessGroup, migrate_hub_database, start_hub
from fleet.transport.ports import free_port
from models import EDGE_BUNDLE
from tests.conftest import need, wait_until
from tests.updates import UpdateKit

GRACE_S = 30.0  # the manifests' terminationGracePeriodSeconds
rng = np.random.default_rng(0)


def _answered(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(
        r'^ehi_hub_offloads_answered_total\{outcome="answered"\} (\S+)', text, re.M))


def test_two_replicas_share_the_work_and_one_leaves_on_sigterm(
        database_url: str, kit: UpdateKit, tmp_path: Path) -> None:
    need(mosquitto_path() is not None, "mosquitto is not installed")
    env = {"EHI_HUB_MIGRATE_ON_START": "false", "EHI_HUB_ARTIFACT_STORE": "database",
           "EHI_HUB_TRUSTED_KEYS": f'["{kit.pub.to_text()}"]',
           "EHI_HUB_ASSIGNMENT_KEY": str(tmp_path / "hub.key")}
    migrate_hub_database(database_url)
    with ProcessGroup() as group:
        broker = start_broker(group, tmp_path, "mosquitto")
        hubs = {}
        for name in ("hub-a", "hub-b"):
            port = free_port()
            (tmp_path / name).mkdir()
            proc = start_hub(group, tmp_path / name, port=port, broker_port=broker.port,
                             log_path=tmp_path / f"{name}.log", database_url=database_url,
                             env={**env, "EHI_HUB_REPLICA_ID": name})
            hubs[name] = (f"http://127.0.0.1:{port}", proc)
        def ready(url: str) -> bool:
            return httpx.get(f"{url}/readyz", timeout=5).status_code == 200

        for url, proc in hubs.values():
            assert wait_until(lambda u=url: ready(u), 60), proc.tail()  # type: ignore[misc]
        # A bundle uploaded to one replica is served by the other.
        a_url, b_url = hubs["hub-a"][0], hubs["hub-b"][0]
        r = httpx.post(f"{a_url}/v1/models", content=pack_bundle(kit.version(5)), timeout=60)
        assert r.status_code == 201, r.text
        model = (kit.version(5) / "model.onnx").read_bytes()
        got = httpx.get(f"{b_url}/v1/models/digits-edge/5/files/model.onnx", timeout=30)
        assert got.status_code == 200 and got.content == model
        part = httpx.get(f"{b_url}/v1/models/digits-edge/5/files/model.onnx",
                         headers={"Range": "bytes=10-99"}, timeout=30)
        assert part.status_code == 206 and part.content == model[10:100]

        agents = [Agent(AgentSettings(device_id=f"rep-{i}", bundle=EDGE_BUNDLE,
                                      telemetry_interval_s=60,
                                      mqtt={"port": broker.port, "protocol": "5"},
                                      results={"flush_interval_s": 0.05, "store": "memory"}))
                  for i in range(2)]
        for a in agents:
            a.start(wait_connected_s=10)
        try:
            time.sleep(0.5)  # both replicas' shared subscriptions are in place
            produced = 0
            for _ in range(40):
                for a in agents:
                    a.infer(rng.uniform(0, 16, (8, 8)).astype(np.float32), deadline_ms=2000)
                    produced += 1
            assert wait_until(lambda: _answered(a_url) > 0 and _answered(b_url) > 0, 30), \
                (_answered(a_url), _answered(b_url))
            # SIGTERM to one replica while traffic goes on: it leaves within its grace period.
            a_proc = hubs["hub-a"][1]
            t0 = time.monotonic()
            a_proc.proc.send_signal(signal.SIGTERM)
            for _ in range(40):
                for a in agents:
                    a.infer(rng.uniform(0, 16, (8, 8)).astype(np.float32), deadline_ms=2000)
                    produced += 1
            a_proc.proc.wait(GRACE_S)
            exit_s = time.monotonic() - t0
            # uvicorn shuts down gracefully (the bridge says so), then re-raises the signal.
            assert a_proc.proc.returncode in (0, -signal.SIGTERM), a_proc.tail()
            assert exit_s < GRACE_S and "stopping: no new messages" in a_proc.tail(50)
            for a in agents:
                assert a.drain(30), f"{len(a.outbox)} results not acknowledged"
            count = httpx.get(f"{b_url}/v1/results/count", timeout=10).json()["count"]
            assert count == produced  # every result stored once, none lost
        finally:
            for a in agents:
                a.stop()
