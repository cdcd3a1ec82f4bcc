"""The rollout state machine on SQLite and PostgreSQL: every transition, gates halting and
reverting, a hub restart mid-stage, devices joining late, overlapping rollouts refused, the
rate limit and the controller's lease. Devices are played by writing what they would report."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from cloud_hub.db import (
    Device,
    ModelVersion,
    RollbackDirective,
    RolloutDevice,
    init_db,
    make_engine,
    session_factory,
)
from cloud_hub.errors import Conflict
from cloud_hub.ingest import ingest_results
from cloud_hub.metrics import HubMetrics
from cloud_hub.registry import add_rollback
from cloud_hub.rollout_gates import RolloutPolicy
from cloud_hub.rollouts import (
    LEASE_TTL_S,
    RolloutController,
    create_rollout,
    get_rollout,
    transition,
)
from fleet.contract import protocol as p
from fleet.contract.assignment import decode_desired, rollback_directive
from fleet.contract.bundle import MANIFEST_NAME
from fleet.contract.signing import PrivateKey
from tests.updates import UpdateKit

FAST = RolloutPolicy(min_results=0, bake_s=0)
T0 = 1_800_000_000.0


class Fleet:
    """Receives the hub's assignments and answers as devices would, through the database."""

    def __init__(self, sessions: sessionmaker, kit: UpdateKit) -> None:
        self.sessions, self.kit = sessions, kit
        self.sent: list[tuple[str, bytes]] = []
        self.unhealthy: set[str] = set()

    def __call__(self, topic: str, payload: bytes) -> bool:
        self.sent.append((topic, payload))
        return True

    def follow(self, now: float) -> None:
        """Every device does what its newest assignment asks."""
        newest: dict[str, str] = {}
        for _, payload in self.sent:
            a = decode_desired(payload, [self.kit.hub_key.public])
            newest[a.device] = a.ref
        with self.sessions() as s:
            for dev, ref in newest.items():
                d = s.get(Device, dev)
                assert d is not None
                if ref in self.unhealthy:
                    d.update_state, d.update_target, d.update_code = "failed", ref, "health"
                else:
                    d.model, d.update_state, d.update_target = ref, "idle", ref
                d.reported_at = now
            s.commit()

    def assigned(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for _, payload in self.sent:
            a = decode_desired(payload, [self.kit.hub_key.public])
            out.setdefault(a.device, []).append(a.ref)
        return out


@pytest.fixture
def sessions(database_url: str, kit: UpdateKit) -> Iterator[sessionmaker]:
    eng = make_engine(database_url)
    init_db(eng)
    s = session_factory(eng)
    with s() as db:
        for i in range(20):
            db.add(Device(id=f"dev-{i:02d}", first_seen=T0, last_seen=T0, online=True,
                          model="digits-edge@1", duplicates=0,
                          reported_labels={"site": "berlin" if i < 12 else "lyon"}))
        for v in (1, 2, 3):
            m = json.loads((kit.version(v) / MANIFEST_NAME).read_text())
            db.add(ModelVersion(name="digits-edge", version=v, manifest=m, total_bytes=1,
                                keyid=kit.pub.keyid, uploaded_at=T0))
        db.commit()
        soon = datetime.now(UTC) + timedelta(days=1)
        for frm, to in ((2, 1), (3, 1), (3, 2)):
            add_rollback(db, rollback_directive("digits-edge", frm, to, soon,
                                                PrivateKey.read(kit.key)), [kit.pub])
    yield s
    eng.dispose()


def _controller(sessions: sessionmaker, kit: UpdateKit, fleet: Fleet) -> RolloutController:
    return RolloutController(sessions, kit.hub_key, fleet, tick_s=1.0,
                             holder=f"test-{uuid.uuid4().hex[:6]}", metrics=HubMetrics())


def _metric(c: RolloutController, name: str, **labels: str) -> float:
    assert c.metrics is not None
    return c.metrics.registry.get_sample_value(name, labels) or 0.0


def _run(c: RolloutController, fleet: Fleet, rid: int, start: float, steps: int = 30,
         states: list[tuple[str, int]] | None = None) -> str:
    now = start
    for _ in range(steps):
        c.step_all(now)
        fleet.follow(now)
        with c.sessions() as s:
            r = get_rollout(s, rid)
            if states is not None and (not states or states[-1] != (r.state, r.stage)):
                states.append((r.state, r.stage))
            if r.state in ("completed", "halted", "rolled_back") and not s.scalar(
                    select(RolloutDevice.device).where(RolloutDevice.rollout_id == rid,
                                                       RolloutDevice.state == "reverting")):
                return r.state
        now += 1.0
    raise AssertionError("the rollout did not end")


def _models(sessions: sessionmaker) -> dict[str, str | None]:
    with sessions() as s:
        return {d.id: d.model for d in s.scalars(select(Device))}


def test_a_good_rollout_goes_through_every_stage(sessions: sessionmaker, kit: UpdateKit) -> None:
    fleet = Fleet(sessions, kit)
    with sessions() as s:
        rid = create_rollout(s, "digits-edge", 2, "site=berlin", ["5%", "25%", "100%"], FAST).id
        assert get_rollout(s, rid).state == "pending"
    states: list[tuple[str, int]] = []
    c = _controller(sessions, kit, fleet)
    assert _run(c, fleet, rid, T0, states=states) == "completed"
    assert _metric(c, "ehi_hub_rollout_assignments_total", kind="assign") == 12
    assert _metric(c, "ehi_hub_rollout_stages_total", decision="passed", gate="") == 3
    assert _metric(c, "ehi_hub_rollouts", state="completed") == 1
    assert states[0][0] == "running"
    assert ("running", 1) in states and ("running", 2) in states
    models = _models(sessions)
    assert all(models[f"dev-{i:02d}"] == "digits-edge@2" for i in range(12))
    assert all(models[f"dev-{i:02d}"] == "digits-edge@1" for i in range(12, 20))  # lyon
    assert all(len(v) == 1 for v in fleet.assigned().values())  # each assigned once


def test_failed_installs_halt_the_first_stage_and_revert_it(sessions: sessionmaker,
                                                            kit: UpdateKit) -> None:
    fleet = Fleet(sessions, kit)
    fleet.unhealthy.add("digits-edge@3")
    with sessions() as s:
        rid = create_rollout(s, "digits-edge", 3, "", ["#4", "50%", "100%"], FAST).id
    assert _run(_controller(sessions, kit, fleet), fleet, rid, T0) == "halted"
    with sessions() as s:
        r = get_rollout(s, rid)
        assert r.stage == 0 and "install failures 4/4" in (r.reason or "")
        rows = list(s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rid)))
    assert len(rows) == 4 and {x.state for x in rows} == {"reverted"}
    assigned = fleet.assigned()
    assert len(assigned) == 4  # nobody outside the first stage was touched
    assert all(refs == ["digits-edge@3", "digits-edge@1"] for refs in assigned.values())


def _results(sessions: sessionmaker, device: str, model: str, n: int, offload: float,
             ts: float) -> None:
    recs = []
    for i in range(n):
        off = i < round(n * offload)
        recs.append(p.ResultRecord(
            id=uuid.uuid4().hex, device=device, seq=i, ts=ts, input_ref=None, model=model,
            backend="onnxruntime", policy="entropy", score=0.1, edge_label=1,
            edge_confidence=0.9, offloaded=off, cloud_label=1 if off else None,
            cloud_model="digits-cloud@1" if off else None, final_label=1,
            source="cloud" if off else "edge", latency_ms=3.0 if off else 0.2, edge_ms=0.1,
            offload_bytes=450 if off else 0))
    ingest_results(sessions, recs)


def test_the_ml_gate_halts_a_model_that_offloads_more(sessions: sessionmaker,
                                                      kit: UpdateKit) -> None:
    fleet = Fleet(sessions, kit)
    policy = RolloutPolicy(min_results=300, bake_s=0)
    for i in range(20):
        _results(sessions, f"dev-{i:02d}", "digits-edge@1", 200, 0.2, T0 - 100)
    with sessions() as s:
        rid = create_rollout(s, "digits-edge", 2, "", ["#4", "100%"], policy).id
    c = _controller(sessions, kit, fleet)
    c.step_all(T0)
    fleet.follow(T0)
    c.step_all(T0 + 1)
    with sessions() as s:
        r = get_rollout(s, rid)
        assert r.state == "running" and r.gates and r.gates["decision"] == "wait"
        stage = [x.device for x in s.scalars(select(RolloutDevice).where(
            RolloutDevice.rollout_id == rid))]
    for d in stage:
        _results(sessions, d, "digits-edge@2", 100, 0.45, T0 + 2)
    assert _run(c, fleet, rid, T0 + 3) == "halted"
    with sessions() as s:
        r = get_rollout(s, rid)
        assert "offload_rate" in (r.reason or "") and r.stage == 0
    assert _metric(c, "ehi_hub_rollout_stages_total", decision="halted",
                   gate="offload_rate") == 1
    assert _metric(c, "ehi_hub_rollout_assignments_total", kind="revert") == 4
    models = _models(sessions)
    assert all(models[d] == "digits-edge@1" for d in stage) and len(stage) == 4
    assert set(fleet.assigned()) == set(stage)


def test_a_restarted_hub_continues_where_it_was(sessions: sessionmaker, kit: UpdateKit) -> None:
    fleet = Fleet(sessions, kit)
    with sessions() as s:
        rid = create_rollout(s, "digits-edge", 2, "", ["#2", "#10", "100%"], FAST).id
    first = _controller(sessions, kit, fleet)
    assert first.lead(T0)
    first.step_all(T0)
    fleet.follow(T0)
    first.step_all(T0 + 1)
    with sessions() as s:
        assert get_rollout(s, rid).stage == 1
    # The hub dies; a new one takes over once the lease has run out.
    second = _controller(sessions, kit, fleet)
    assert not second.lead(T0 + 2)
    assert second.lead(T0 + 2 + LEASE_TTL_S)
    assert _run(second, fleet, rid, T0 + 3 + LEASE_TTL_S) == "completed"
    assert all(len(v) == 1 for v in fleet.assigned().values()) and len(fleet.assigned()) == 20


def test_devices_that_register_late_join_and_overlaps_are_refused(sessions: sessionmaker,
                                                                  kit: UpdateKit) -> None:
    fleet = Fleet(sessions, kit)
    with sessions() as s:
        rid = create_rollout(s, "digits-edge", 2, "site=berlin", ["#1", "100%"], FAST).id
        with pytest.raises(Conflict, match=f"rollout {rid}"):
            create_rollout(s, "digits-edge", 3, "", ["100%"], FAST)
        # Disjoint selectors may run side by side.
        other = create_rollout(s, "digits-edge", 3, "site=lyon", ["100%"], FAST).id
    c = _controller(sessions, kit, fleet)
    c.step_all(T0)
    with sessions() as s:
        s.add(Device(id="late-1", first_seen=T0, last_seen=T0, online=True,
                     model="digits-edge@1", duplicates=0, reported_labels={"site": "berlin"}))
        s.commit()
    assert _run(c, fleet, rid, T0 + 1) == "completed"
    assert _run(c, fleet, other, T0 + 40) == "completed"
    models = _models(sessions)
    assert models["late-1"] == "digits-edge@2"
    assert sum(m == "digits-edge@3" for m in models.values()) == 8


def test_operator_transitions(sessions: sessionmaker, kit: UpdateKit) -> None:
    fleet = Fleet(sessions, kit)
    with sessions() as s:
        rid = create_rollout(s, "digits-edge", 2, "", ["#5", "100%"], FAST).id
        with pytest.raises(Conflict, match="cannot resume"):
            transition(s, rid, "resume")
        assert transition(s, rid, "pause").state == "paused"
    c = _controller(sessions, kit, fleet)
    c.step_all(T0)
    assert fleet.sent == []  # paused: nothing assigned
    with sessions() as s:
        assert transition(s, rid, "resume").state == "running"
    c.step_all(T0 + 1)
    fleet.follow(T0 + 1)
    assert len(fleet.assigned()) == 5
    with sessions() as s:
        r = transition(s, rid, "rollback", kit.hub_key, fleet)
        assert r.state == "rolled_back"
        with pytest.raises(Conflict):
            transition(s, rid, "pause")
    assert _run(c, fleet, rid, T0 + 2) == "rolled_back"
    assert set(_models(sessions).values()) == {"digits-edge@1"}
    with sessions() as s:
        rid2 = create_rollout(s, "digits-edge", 2, "", ["100%"], FAST).id
        assert transition(s, rid2, "abort").state == "halted"
        assert get_rollout(s, rid2).reason == "aborted by an operator"


def test_the_rate_limit_spreads_assignments(sessions: sessionmaker, kit: UpdateKit) -> None:
    fleet = Fleet(sessions, kit)
    with sessions() as s:
        rid = create_rollout(s, "digits-edge", 2, "", ["100%"],
                             RolloutPolicy(min_results=0, bake_s=0, max_rate_per_min=6)).id
    c = _controller(sessions, kit, fleet)
    c.step_all(T0)
    c.step_all(T0 + 30)
    assert len(fleet.sent) == 6
    c.step_all(T0 + 61)
    assert len(fleet.sent) == 12
    with sessions() as s:
        assert get_rollout(s, rid).state == "running"


def test_a_rollout_that_could_not_revert_is_refused_up_front(sessions: sessionmaker,
                                                             kit: UpdateKit) -> None:
    with sessions() as s:
        d = s.get(Device, "dev-00")
        assert d is not None
        d.model = "digits-edge@2"
        s.execute(delete(RollbackDirective).where(RollbackDirective.to_version == 2))
        s.commit()
        with pytest.raises(Conflict, match="fleet models rollback digits-edge --from 3 --to 2"):
            create_rollout(s, "digits-edge", 3, "", ["100%"], FAST)
        # Narrowed to devices that can go back, it starts.
        assert create_rollout(s, "digits-edge", 3, "site=lyon", ["100%"], FAST).state == \
            "pending"
