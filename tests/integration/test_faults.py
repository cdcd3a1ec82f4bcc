"""Nothing is lost and nothing stored twice, whatever fails: real Mosquitto, hub and agents."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from cloud_hub.bridge import Bridge
from cloud_hub.db import Device, HardExample, Result, init_db, make_engine, session_factory
from cloud_hub.ingest import ingest_results
from cloud_hub.metrics import HubMetrics
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from edge_agent.outbox_store import EntryKind
from fleet.contract import protocol as p
from fleet.inference.engine import Engine
from fleet.lab.brokers import RunningBroker
from fleet.lab.fault_injection import FaultPlan, ScenarioOptions, run_scenario
from fleet.transport.mqtt import MqttConfig
from models import CLOUD_BUNDLE, EDGE_BUNDLE, STREAMS_FILE
from tests.conftest import need, wait_until

CONNECT_S = 10.0


@pytest.mark.mosquitto
@pytest.mark.slow
def test_broker_outage_agent_and_hub_kill_lose_nothing(database_url: str) -> None:
    """The scenario of bench/faults.py, smaller and quicker: 2 agents, 600 answers, a 4 s
    broker outage, two agent kill -9 and one hub kill -9 (down 12 s), each followed by a
    restart; the hub on SQLite and on PostgreSQL."""
    from fleet.lab.brokers import mosquitto_path

    need(mosquitto_path() is not None, "mosquitto is not installed")
    plan = FaultPlan(agent_kills=(2.0, 12.0), broker_outage_at=4.0, broker_outage_s=4.0,
                     hub_kill_at=9.0, hub_down_s=12.0)
    r = run_scenario(ScenarioOptions(agents=2, results=600, rate_hz=20, plan=plan,
                                     drain_timeout_s=90, database_url=database_url,
                                     results_settings={"resend_after_s": 1.0}))
    assert r["results_produced"] == 600
    assert r["lost"] == 0 and r["duplicates_in_db"] == 0, r
    assert r["drain_seconds"] is not None, r
    assert r["outage_submitted"] > 0 and r["outage_answered"] == r["outage_submitted"], r
    assert r["error_answers"] == 0
    # Every input answered without the cloud was still answered by it, late.
    assert r["degraded_answers"] > 0 and r["late_answers_missing"] == 0, r
    assert [f["fault"] for f in r["faults"]].count("restart hub") == 1
    # While the hub was down (12 s, resends after 1 s doubling: at about 1, 3, 7 s), each
    # entry owed went out a few times, not once a second.
    out = r["hub_outage"]
    assert out["entries_owed"] > 0 and 0 < out["resends_per_entry"] <= 5, out


@pytest.mark.mosquitto
def test_bad_and_duplicate_entries_never_block_the_queue(mosquitto: RunningBroker,
                                                         tmp_path: Path) -> None:
    """A corrupt record is refused by id and leaves; a record the hub already has is
    acknowledged as a duplicate; the records behind them all arrive."""
    eng = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    init_db(eng)
    sessions = session_factory(eng)
    hub = Bridge(Engine.open(CLOUD_BUNDLE, "onnxruntime"), sessions, HubMetrics(),
                 batch_max=8, batch_wait_ms=0, offload_queue=100, ingest_queue=100,
                 mqtt=MqttConfig(port=mosquitto.port, client_id="hub-poison"))
    hub.start()
    agent = Agent(AgentSettings(device_id="poison", bundle=EDGE_BUNDLE, telemetry_interval_s=60,
                                mqtt={"port": mosquitto.port},
                                results={"flush_interval_s": 0.05}))
    try:
        assert hub.transport.wait_connected(CONNECT_S)
        # Before the agent connects: a corrupt entry at the head of its queue, then a record
        # the hub stored already (its acknowledgement was lost, say).
        agent.outbox.add(EntryKind.RESULT, "corrupt-1", b"\x00\xffnot json")
        known = p.ResultRecord(id="known-1", device="poison", seq=0, ts=1.0, model="m@1",
                               backend="onnxruntime", policy="entropy", score=0.0,
                               edge_label=1, edge_confidence=1.0, offloaded=False,
                               final_label=1, source="edge", latency_ms=1.0, edge_ms=1.0)
        ingest_results(sessions, [known])
        agent.outbox.add(EntryKind.RESULT, "known-1", p.record_blob(known))
        agent.outbox.add(EntryKind.HARD, "corrupt-2", b"\x00\x00\x00\x05{bad}")
        agent.start(wait_connected_s=CONNECT_S)
        x = np.load(STREAMS_FILE)["clean_x"][:30]
        for xi in x:
            agent.infer(xi)
        assert agent.drain(15), f"{len(agent.outbox)} entries stuck"
        s = agent.outbox.stats()
        assert s.rejected == 2 and s.results_acked == 31
        with sessions() as db:
            assert len(list(db.scalars(select(Result.id)))) == 31
            assert db.get(Device, "poison").duplicates == 1
    finally:
        agent.stop()
        hub.stop()
        eng.dispose()


@pytest.mark.mosquitto
def test_offline_hard_inputs_get_a_late_cloud_answer(tmp_path: Path) -> None:
    """No broker at all while the agent works; then broker and hub come; every hard input the
    agent answered alone is answered by the cloud and stored with that answer."""
    from fleet.lab.brokers import mosquitto_path, start_broker
    from fleet.lab.processes import ProcessGroup
    from fleet.transport.ports import free_port

    need(mosquitto_path() is not None, "mosquitto is not installed")
    port = free_port()
    agent = Agent(AgentSettings(device_id="late", bundle=EDGE_BUNDLE, telemetry_interval_s=60,
                                mqtt={"port": port},
                                results={"flush_interval_s": 0.05}))
    agent.start()
    data = np.load(STREAMS_FILE)
    x = data["mixed_x"][:200]
    answers = [agent.infer(xi) for xi in x]
    hard = [a for a in answers if a.offloaded]
    assert hard and all(a.degraded and a.source == "edge_fallback" for a in hard)
    assert agent.outbox.pending(EntryKind.HARD) == len(hard)
    with ProcessGroup() as group:
        broker = start_broker(group, tmp_path, "mosquitto", port=port)
        eng = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
        init_db(eng)
        hub = Bridge(Engine.open(CLOUD_BUNDLE, "onnxruntime"), session_factory(eng), HubMetrics(),
                     batch_max=8, batch_wait_ms=0, offload_queue=100, ingest_queue=100,
                     mqtt=MqttConfig(port=broker.port, client_id="hub-late"))
        hub.start()
        try:
            assert hub.transport.wait_connected(CONNECT_S)
            assert wait_until(lambda: agent.transport.connected, 15)
            assert agent.drain(30), f"{len(agent.outbox)} entries stuck"
            with hub.sessions() as s:
                rows = {r.id: r for r in s.scalars(select(HardExample))}
                results = {r.id: r for r in s.scalars(select(Result))}
            assert set(rows) == {a.id for a in hard}
            assert {r.reason for r in rows.values()} == {"offline"}
            assert len(results) == 200 and all(results[a.id].degraded for a in hard)
            time.sleep(0.1)
        finally:
            agent.stop()
            hub.stop()
            eng.dispose()
