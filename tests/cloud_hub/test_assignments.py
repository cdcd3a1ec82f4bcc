"""Desired-model assignments in the hub's database (SQLite and PostgreSQL): seq, signatures,
rollback directives, publishing after a broker outage, devices' reports."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import sessionmaker

from cloud_hub.assignments import assign, publish_pending, record_reported
from cloud_hub.db import DesiredModel, Device, ModelVersion, init_db, make_engine, session_factory
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.registry import add_rollback
from fleet.contract.assignment import Reported, UpdateState, decode_desired, rollback_directive
from fleet.contract.bundle import MANIFEST_NAME
from fleet.contract.signing import PrivateKey
from tests.updates import UpdateKit


class Broker:
    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.sent: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes) -> bool:
        if self.up:
            self.sent.append((topic, payload))
        return self.up


@pytest.fixture
def sessions(database_url: str, kit: UpdateKit) -> Iterator[sessionmaker]:
    eng = make_engine(database_url)
    init_db(eng)
    s = session_factory(eng)
    with s() as db:
        db.add(Device(id="dev-1", first_seen=1.0, last_seen=1.0, online=True,
                      model="digits-edge@3", duplicates=0))
        for v in (2, 3, 4):
            m = json.loads((kit.version(v) / MANIFEST_NAME).read_text())
            db.add(ModelVersion(name="digits-edge", version=v, manifest=m, total_bytes=1,
                                keyid=kit.pub.keyid, uploaded_at=time.time()))
        db.commit()
    yield s
    eng.dispose()


def test_assignments_are_signed_numbered_and_published(sessions: sessionmaker,
                                                       kit: UpdateKit) -> None:
    broker = Broker()
    with sessions() as s:
        d = assign(s, kit.hub_key, "dev-1", "digits-edge", 4, broker)
        assert (d.seq, d.published) == (1, True)
        d = assign(s, kit.hub_key, "dev-1", "digits-edge", 4, broker)
        assert d.seq == 2
    topic, payload = broker.sent[-1]
    assert topic == "ehi/v1/dev-1/desired"
    a = decode_desired(payload, [kit.hub_key.public])
    assert (a.device, a.seq, a.ref, a.rollback) == ("dev-1", 2, "digits-edge@4", None)


def test_unknown_device_or_model_and_rollbacks(sessions: sessionmaker, kit: UpdateKit) -> None:
    broker = Broker()
    with sessions() as s:
        with pytest.raises(NotFound, match="unknown device"):
            assign(s, kit.hub_key, "ghost", "digits-edge", 4, broker)
        with pytest.raises(NotFound, match="no model"):
            assign(s, kit.hub_key, "dev-1", "digits-edge", 9, broker)
        with pytest.raises(Conflict, match="rollback directive"):
            assign(s, kit.hub_key, "dev-1", "digits-edge", 2, broker)
        directive = rollback_directive("digits-edge", 3, 2, datetime.now(UTC) + timedelta(days=1),
                                       PrivateKey.read(kit.key))
        add_rollback(s, directive, [kit.pub])
        d = assign(s, kit.hub_key, "dev-1", "digits-edge", 2, broker)
        assert d.version == 2
    a = decode_desired(broker.sent[-1][1], [kit.hub_key.public])
    assert a.rollback is not None and a.rollback["to_version"] == 2


def test_assignments_made_while_the_broker_is_away_go_out_on_reconnect(
        sessions: sessionmaker, kit: UpdateKit) -> None:
    down = Broker(up=False)
    with sessions() as s:
        d = assign(s, kit.hub_key, "dev-1", "digits-edge", 4, down)
        assert not d.published
    up = Broker()
    assert publish_pending(sessions, up) == 1
    assert publish_pending(sessions, up) == 0
    with sessions() as s:
        row = s.get(DesiredModel, "dev-1")
        assert row is not None and row.published


def test_reports_land_on_the_device(sessions: sessionmaker, tmp_path: Path) -> None:
    record_reported(sessions, "dev-1", Reported("dev-1", "digits-edge@3", UpdateState.FAILED,
                                                "digits-edge@4", "x" * 5000, "health", 3, 5.0))
    record_reported(sessions, "new-dev", Reported("new-dev", "digits-edge@1", UpdateState.IDLE))
    with sessions() as s:
        d = s.get(Device, "dev-1")
        assert d is not None and d.update_error is not None
        assert (d.update_state, d.update_code, d.update_target) == ("failed", "health",
                                                                    "digits-edge@4")
        assert len(d.update_error) == 1024
        new = s.get(Device, "new-dev")
        assert new is not None and new.model == "digits-edge@1"


def test_offload_setting_rides_the_assignment_and_survives_reassignment(
        sessions: sessionmaker, kit: UpdateKit) -> None:
    from cloud_hub.assignments import set_offload
    from fleet.contract.assignment import OffloadTarget

    broker = Broker()
    with sessions() as s:
        # No desired model yet: the hub reissues the registry bundle the device runs.
        d = set_offload(s, kit.hub_key, "dev-1", OffloadTarget("budget", 0.15), broker)
        assert (d.name, d.version, d.seq) == ("digits-edge", 3, 1)
        a = decode_desired(broker.sent[-1][1], [kit.hub_key.public])
        assert a.offload == OffloadTarget("budget", 0.15) and a.version == 3
        # A rollout's assignment of another version keeps the device's offload setting.
        assign(s, kit.hub_key, "dev-1", "digits-edge", 4, broker)
        a = decode_desired(broker.sent[-1][1], [kit.hub_key.public])
        assert a.version == 4 and a.offload == OffloadTarget("budget", 0.15)
        # Taken back: the device's own settings again.
        set_offload(s, kit.hub_key, "dev-1", None, broker)
        a = decode_desired(broker.sent[-1][1], [kit.hub_key.public])
        assert a.version == 4 and a.offload is None and a.seq == 3
        # A device running a bundle the registry does not hold cannot be given one.
        s.add(Device(id="dev-2", first_seen=1.0, last_seen=1.0, online=True,
                     model="digits-edge@1", duplicates=0))
        s.commit()
        with pytest.raises(Conflict, match="not in the registry"):
            set_offload(s, kit.hub_key, "dev-2", OffloadTarget("threshold"), broker)
        with pytest.raises(NotFound):
            set_offload(s, kit.hub_key, "nobody", OffloadTarget("threshold"), broker)


def test_reported_fidelity_is_kept(sessions: sessionmaker) -> None:
    fid = {"backend": "openvino", "agreement": 1.0, "min_agreement": 0.995,
           "refused": {"onnxruntime": "agreement 97.08% below the floor"}}
    payload = Reported("dev-1", "digits-edge@3", UpdateState.IDLE, fidelity=fid).encode()
    record_reported(sessions, "dev-1", Reported.decode(payload))
    with sessions() as s:
        dev = s.get(Device, "dev-1")
        assert dev is not None and dev.fidelity == fid
