"""The hub against a real database (SQLite and PostgreSQL) and the in-memory bus."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cloud_hub.bridge import Bridge
from cloud_hub.core.config import HubSettings
from cloud_hub.db import Result, init_db, make_engine, session_factory
from cloud_hub.ingest import ingest_results
from cloud_hub.main import create_app
from cloud_hub.metrics import HubMetrics
from fleet.contract import protocol as p
from fleet.inference.engine import Engine
from fleet.transport.mqtt import MemoryBus, MemorySession
from models import CLOUD_BUNDLE, STREAMS_FILE
from tests.conftest import wait_until


def record(i: int, device: str = "dev-1", **kw: object) -> p.ResultRecord:
    base = dict(id=f"r{i:05d}", device=device, seq=i, ts=1000.0 + i, input_ref=f"s:{i}",
                model="digits-edge@1", backend="onnxruntime", policy="entropy", score=0.1,
                edge_label=i % 10, edge_confidence=0.9, offloaded=i % 4 == 0,
                cloud_label=(i % 10 if i % 8 == 0 else (i + 1) % 10) if i % 4 == 0 else None,
                cloud_model="digits-cloud@1" if i % 4 == 0 else None,
                final_label=i % 10, source="cloud" if i % 4 == 0 else "edge",
                latency_ms=float(i % 7), edge_ms=0.1, offload_bytes=450 if i % 4 == 0 else 0)
    base.update(kw)
    return p.ResultRecord(**base)


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(HubSettings(cloud_bundle=CLOUD_BUNDLE, database_url=database_url,
                                 artifacts_dir=tmp_path / "artifacts",
                                 assignment_key=tmp_path / "hub.key"), with_bridge=False)
    with TestClient(app) as c:
        yield c


def test_ingest_is_idempotent(database_url: str) -> None:
    eng = make_engine(database_url)
    init_db(eng)
    sessions = session_factory(eng)
    first = ingest_results(sessions, [record(i) for i in range(10)])
    assert len(first.inserted) == 10 and first.duplicates == []
    again = ingest_results(sessions, [record(i) for i in range(5, 15)] + [record(14)])
    assert sorted(again.inserted) == [f"r{i:05d}" for i in range(10, 15)]
    assert len(again.duplicates) == 6
    with sessions() as s:
        from sqlalchemy import func, select

        from cloud_hub.db import Result
        assert s.scalar(select(func.count()).select_from(Result)) == 15
    eng.dispose()


def test_api_results_paging_filters_and_stats(client: TestClient) -> None:
    sessions = client.app.state.sessions  # type: ignore[attr-defined]
    ingest_results(sessions, [record(i) for i in range(30)]
                   + [record(i, device="dev-2") for i in range(100, 110)])
    seen, cursor = [], 0
    while True:
        r = client.get("/v1/results", params={"limit": 7, "cursor": cursor})
        assert r.status_code == 200
        page = r.json()
        seen += page["items"]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert len(seen) == 40 and len({x["id"] for x in seen}) == 40
    off = client.get("/v1/results", params={"offloaded": True, "device": "dev-1",
                                            "limit": 100}).json()["items"]
    assert len(off) == 8 and all(x["offloaded"] for x in off)
    since = client.get("/v1/results", params={"since": 1020, "device": "dev-1"}).json()["items"]
    assert [x["seq"] for x in since] == list(range(20, 30))

    assert client.get("/v1/results/count").json() == {"count": 40}
    assert client.get("/v1/results/count", params={"device": "dev-1", "offloaded": True}
                      ).json() == {"count": 8}
    stats = client.get("/v1/stats").json()
    assert stats["total"]["count"] == 40
    g1 = next(g for g in stats["groups"] if g["device"] == "dev-1")
    assert g1["model"] == "digits-edge@1"
    assert g1["offload_rate"] == pytest.approx(8 / 30, abs=1e-4)
    # offloaded ids 0, 4, ..., 28: the cloud agrees with the edge on multiples of 8.
    assert g1["agreement"] == pytest.approx(4 / 8)
    assert g1["bytes_offloaded"] == 8 * 450
    assert set(g1["latency_ms"]) == {"p50", "p95", "p99"}
    assert client.get("/v1/stats", params={"device": "dev-2"}).json()["total"]["count"] == 10


def test_api_health_devices_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["database"] is True
    assert client.get("/v1/devices/nope").status_code == 404
    ingest_results(client.app.state.sessions, [record(1)])  # type: ignore[attr-defined]
    ingest_results(client.app.state.sessions, [record(1)])  # type: ignore[attr-defined]
    devs = client.get("/v1/devices").json()
    assert [d["id"] for d in devs] == ["dev-1"] and devs[0]["duplicates"] == 1
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    assert "ehi_hub" in client.get("/metrics").text
    assert client.get("/v1/results", params={"limit": 0}).status_code == 422
    r = client.put("/v1/devices/dev-1/labels", json={"labels": {"site": "berlin", "hw": "rpi4"}})
    assert r.status_code == 200 and r.json()["labels"] == {"site": "berlin", "hw": "rpi4"}
    for bad in ({"site": "two words"}, {"bad key": "x"}, {f"k{i}": "v" for i in range(40)}):
        r = client.put("/v1/devices/dev-1/labels", json={"labels": bad})
        assert r.status_code == 422, bad
    r = client.put("/v1/devices/dev-1/labels", json={"labels": {"hw": None}})
    assert r.json()["labels"] == {"site": "berlin"}
    assert [d["id"] for d in client.get("/v1/devices",
                                        params={"selector": "site=berlin"}).json()] == ["dev-1"]
    assert client.get("/v1/devices", params={"selector": "a b"}).status_code == 422


# ---------------------------------------------------------------- bridge


@pytest.fixture(params=[0.0, 50.0], ids=["batcher", "inline"])
def bridge_on_bus(database_url: str, request: pytest.FixtureRequest
                  ) -> Iterator[tuple[Bridge, MemoryBus, list]]:
    bus = MemoryBus()
    eng = make_engine(database_url)
    init_db(eng)
    cloud = Engine.open(CLOUD_BUNDLE, "onnxruntime")
    bridge = Bridge(cloud, session_factory(eng), HubMetrics(), batch_max=16, batch_wait_ms=0,
                    inline_max_ms=request.param,
                    offload_queue=100, ingest_queue=100,
                    transport_factory=functools.partial(MemorySession, bus))
    inbox: list[tuple[str, bytes]] = []
    bus.subscribe("ehi/v1/+/answer", lambda t, b: inbox.append((t, b)))
    bus.subscribe("ehi/v1/+/ack", lambda t, b: inbox.append((t, b)))
    bridge.start()
    yield bridge, bus, inbox
    bridge.stop()
    eng.dispose()



def _bad(bridge: Bridge, reason: str) -> float:
    return bridge.metrics.registry.get_sample_value("ehi_hub_bad_messages_total",
                                                    {"reason": reason}) or 0.0


def test_bridge_answers_offloads_with_the_cloud_model(bridge_on_bus) -> None:
    _bridge, bus, inbox = bridge_on_bus
    data = np.load(STREAMS_FILE)
    x, y = data["clean_x"][:20], data["clean_y"][:20]
    for i, xi in enumerate(x):
        bus.publish(p.topic("dev-1", p.Channel.OFFLOAD),
                    p.Offload(f"o{i}", "digits-edge@1", xi, 100, time.time(), 0, 0.5).encode())
    assert wait_until(lambda: len(inbox) == 20)
    answers = {a.id: a for a in (p.Answer.decode(b) for _, b in inbox)}
    assert all(t == "ehi/v1/dev-1/answer" for t, _ in inbox)
    labels = np.array([answers[f"o{i}"].label for i in range(20)])
    assert (labels == y).mean() >= 0.9


def test_bridge_survives_bad_messages(bridge_on_bus) -> None:
    bridge, bus, inbox = bridge_on_bus
    bus.publish("ehi/v1/dev-1/offload", b"\x00garbage")
    v9 = bytearray(p.Offload("o", "m", np.zeros((8, 8), np.float32), 1, 0, 0, 0).encode())
    v9[2] = 9
    bus.publish("ehi/v1/dev-1/offload", bytes(v9))
    bus.publish("ehi/v1/dev-1/results", b"not a frame")
    bus.publish("ehi/v1/dev-1/telemetry", b"EH\x01\x05\x00\x00\x00\x01[")
    wrong = p.Offload("o2", "m", np.zeros((3, 3), np.float32), 100, 0, 0, 0).encode()
    bus.publish("ehi/v1/dev-1/offload", wrong)
    # Telemetry a device could use to fill the hub's database: refused before it is parsed.
    bus.publish("ehi/v1/dev-1/telemetry", p.encode_frame(p.Kind.TELEMETRY,
                                                         {"pad": "x" * (100 << 10)}))
    assert wait_until(lambda: _bad(bridge, "malformed") == 3 and _bad(bridge, "version") == 1
                      and _bad(bridge, "too_large") == 1)
    assert wait_until(lambda: len(inbox) == 1)
    err = p.Answer.decode(inbox[0][1])
    assert err.id == "o2" and err.label == -1 and "does not fit" in (err.error or "")
    # ... and it still works.
    good = p.Offload("o3", "m", np.zeros((8, 8), np.float32), 100, 0, 0, 0).encode()
    bus.publish("ehi/v1/dev-1/offload", good)
    assert wait_until(lambda: len(inbox) == 2)


def test_bridge_acks_after_commit_and_refuses_foreign_records(bridge_on_bus) -> None:
    bridge, bus, inbox = bridge_on_bus
    batch = [record(1), record(2), record(3, device="dev-2")]
    bus.publish("ehi/v1/dev-1/results", p.ResultBatch.of(batch).encode())
    bus.publish("ehi/v1/dev-1/results", p.ResultBatch.of(batch[:2]).encode())  # a resend
    assert wait_until(lambda: len(inbox) == 2)
    acks = [p.Ack.decode(b) for _, b in inbox]
    assert acks[0].ids == ["r00001", "r00002"] and set(acks[0].rejected) == {"r00003"}
    assert sorted(acks[1].ids) == ["r00001", "r00002"]
    reg = bridge.metrics.registry
    assert reg.get_sample_value("ehi_hub_results_inserted_total") == 2
    assert reg.get_sample_value("ehi_hub_results_duplicate_total") == 2
    assert reg.get_sample_value("ehi_hub_results_rejected_total") == 1


def test_bridge_records_status_and_telemetry(bridge_on_bus) -> None:
    bridge, bus, _ = bridge_on_bus
    bus.publish("ehi/v1/dev-7/status", p.status_payload("online", "dev-7"))
    bus.publish("ehi/v1/dev-7/telemetry", p.encode_json(p.Kind.TELEMETRY, {
        "model": "digits-edge@1", "backend": "openvino", "system": {"cpu_percent": 3},
        "outbox": {"entries": 42, "dropped_full": 3, "dropped_expired": 0}}))
    from cloud_hub.db import Device

    def seen() -> bool:
        with bridge.sessions() as s:
            d = s.get(Device, "dev-7")
            return d is not None and d.backend == "openvino" and d.online
    assert wait_until(seen)
    gauge = bridge.metrics.registry.get_sample_value
    assert gauge("ehi_device_outbox", {"device": "dev-7", "figure": "entries"}) == 42
    assert gauge("ehi_device_outbox", {"device": "dev-7", "figure": "dropped_full"}) == 3
    # Labels: kept when a selector can name them; otherwise the old ones stay, counted.
    # (The hub stores each device's newest telemetry every half second: one at a time.)
    def labels_are(want: dict[str, str]) -> bool:
        with bridge.sessions() as s:
            return s.get(Device, "dev-7").reported_labels == want
    bus.publish("ehi/v1/dev-7/telemetry", p.encode_json(p.Kind.TELEMETRY, {
        "model": "digits-edge@1", "labels": {"site": "berlin"}}))
    assert wait_until(lambda: labels_are({"site": "berlin"}))
    bus.publish("ehi/v1/dev-7/telemetry", p.encode_json(p.Kind.TELEMETRY, {
        "model": "digits-edge@1", "labels": {"site": "two words"}}))
    assert wait_until(lambda: (gauge("ehi_hub_bad_messages_total", {"reason": "labels"})
                               or 0) == 1)
    with bridge.sessions() as s:
        assert s.get(Device, "dev-7").reported_labels == {"site": "berlin"}
    bus.publish("ehi/v1/dev-7/status", p.status_payload("offline", "dev-7"))

    def offline() -> bool:
        with bridge.sessions() as s:
            d = s.get(Device, "dev-7")
            return d is not None and not d.online
    assert wait_until(offline)


def test_duplicates_are_counted_per_device_in_the_database(database_url: str) -> None:
    from cloud_hub.db import Device

    eng = make_engine(database_url)
    init_db(eng)
    sessions = session_factory(eng)
    ingest_results(sessions, [record(i) for i in range(4)])
    ingest_results(sessions, [record(i) for i in range(2, 6)] + [record(5)])
    with sessions() as s:
        assert s.get(Device, "dev-1").duplicates == 3  # r2, r3 again; r5 twice in one batch
    eng.dispose()


def _hard(i: int, x: np.ndarray, reason: str = "offline") -> p.HardExample:
    return p.HardExample(f"h{i}", "digits-edge@1", x, 1000.0 + i, 0, 0.5, reason)  # type: ignore[arg-type]


def test_bridge_answers_hard_examples_late_and_stores_them_once(bridge_on_bus) -> None:
    from sqlalchemy import select

    from cloud_hub.db import Device, HardExample
    from cloud_hub.stats import compute_stats

    bridge, bus, inbox = bridge_on_bus
    data = np.load(STREAMS_FILE)
    x, y = data["clean_x"][:10], data["clean_y"][:10]
    exs = [_hard(i, xi, "deadline" if i % 2 else "offline") for i, xi in enumerate(x)]
    bad_shape = _hard(99, np.zeros((3, 3), np.float32))
    ids = [e.id for e in exs] + ["h99", "h-garbage"]
    blobs = [e.blob() for e in exs] + [bad_shape.blob(), b"\x00\x01"]
    topic = p.topic("dev-1", p.Channel.HARD)
    bus.publish(topic, p.encode_hard_batch(ids, blobs))
    bus.publish(topic, p.encode_hard_batch(ids[:3], blobs[:3]))  # a resend
    assert wait_until(lambda: len(inbox) == 2)
    first, second = (p.Ack.decode(b) for _, b in inbox)
    assert first.of == "hard" and sorted(first.ids) == sorted(e.id for e in exs)
    assert set(first.rejected) == {"h99", "h-garbage"} and "does not fit" in first.rejected["h99"]
    assert sorted(second.ids) == ["h0", "h1", "h2"]
    with bridge.sessions() as s:
        rows = {r.id: r for r in s.scalars(select(HardExample))}
        assert s.get(Device, "dev-1").duplicates == 3
        late = compute_stats(s)["late_answers"]
    assert len(rows) == 10
    cloud = np.array([rows[f"h{i}"].cloud_label for i in range(10)])
    assert (cloud == y).mean() >= 0.9  # answered by the cloud model, not copied from the edge
    back = np.frombuffer(rows["h3"].data, dtype=rows["h3"].dtype).reshape(rows["h3"].shape)
    np.testing.assert_array_equal(back, x[3])
    assert late["count"] == 10 and late["by_reason"] == {"deadline": 5, "offline": 5}


def test_api_lists_hard_examples_and_serves_their_inputs(client: TestClient) -> None:
    from cloud_hub.ingest import LateAnswer, ingest_hard_examples

    x = np.arange(64, dtype=np.float32).reshape(8, 8)
    sessions = session_factory(client.app.state.engine)  # type: ignore[attr-defined]
    ingest_hard_examples(sessions, "dev-3", [LateAnswer(_hard(i, x), 7, 0.9, "digits-cloud@1")
                                             for i in range(3)])
    page = client.get("/v1/hard-examples", params={"device": "dev-3", "limit": 2}).json()
    assert [i["id"] for i in page["items"]] == ["h0", "h1"] and page["next_cursor"]
    assert page["items"][0]["cloud_label"] == 7 and page["items"][0]["reason"] == "offline"
    assert client.get("/v1/hard-examples/count").json() == {"count": 3}
    r = client.get("/v1/hard-examples/h1/input")
    assert r.headers["x-ehi-shape"] == "8,8" and r.headers["x-ehi-dtype"] == "float32"
    np.testing.assert_array_equal(np.frombuffer(r.content, np.float32).reshape(8, 8), x)
    assert client.get("/v1/hard-examples/nope/input").status_code == 404
    assert client.get("/v1/stats").json()["late_answers"]["count"] == 3


def test_a_device_over_its_quota_is_cut_off_and_the_others_are_not(database_url: str) -> None:
    bus = MemoryBus()
    eng = make_engine(database_url)
    init_db(eng)
    bridge = Bridge(Engine.open(CLOUD_BUNDLE, "onnxruntime"), session_factory(eng), HubMetrics(),
                    batch_max=16, batch_wait_ms=0, offload_queue=100, ingest_queue=100,
                    transport_factory=functools.partial(MemorySession, bus),
                    quotas={p.Channel.TELEMETRY: (0.5, 3), p.Channel.OFFLOAD: (0.5, 2),
                            p.Channel.STATUS: (0.5, 2)})
    answers: list[tuple[str, bytes]] = []
    bus.subscribe("ehi/v1/+/answer", lambda t, b: answers.append((t, b)))
    bridge.start()
    try:
        telemetry = p.encode_json(p.Kind.TELEMETRY, {"model": "digits-edge@1"})
        for _ in range(10):
            bus.publish("ehi/v1/noisy/telemetry", telemetry)
        bus.publish("ehi/v1/quiet/telemetry", telemetry)
        offload = p.Offload("o", "digits-edge@1", np.zeros((8, 8), np.float32), 100,
                            time.time(), 0, 0.5).encode()
        for _ in range(5):
            bus.publish("ehi/v1/noisy/offload", offload)
        bus.publish("ehi/v1/quiet/offload", offload)
        assert wait_until(lambda: _bad(bridge, "quota") == 7 + 3)
        assert wait_until(lambda: len(answers) == 2 + 1)
        assert sum(1 for t, _ in answers if t == "ehi/v1/quiet/answer") == 1
        from cloud_hub.db import Device

        def both_stored() -> bool:
            with bridge.sessions() as s:
                return s.get(Device, "quiet") is not None and s.get(Device, "noisy") is not None
        assert wait_until(both_stored)
        # State over quota is not lost: the newest is stored a tick later.
        # (the first two pass; "offline" arrives only through the deferral)
        for state in ("online", "online", "online", "online", "offline"):
            bus.publish("ehi/v1/noisy/status", p.status_payload(state, "noisy"))

        def offline() -> bool:
            with bridge.sessions() as s:
                d = s.get(Device, "noisy")
                return d is not None and d.online is False
        assert wait_until(offline, 30)
    finally:
        bridge.stop()
        eng.dispose()


def test_agents_of_both_protocol_versions_share_a_hub(bridge_on_bus) -> None:
    """An upgrade in progress: a version 1 agent and a version 2 agent each get answers and
    acks in their own version, and every record of both is stored once."""
    bridge, bus, inbox = bridge_on_bus
    x = np.arange(64, dtype=np.float32).reshape(8, 8) % 17
    for dev, v in (("old-1", 1), ("new-1", 2)):
        bus.publish(p.topic(dev, p.Channel.OFFLOAD),
                    p.Offload(f"o-{dev}", "digits-edge@1", x, 100, time.time(), 0, 0.5)
                    .encode(v))
        recs = [record(i, device=dev) for i in range(5)]
        recs = [r.model_copy(update={"id": f"{dev}-{r.id}"}) for r in recs]
        bus.publish(p.topic(dev, p.Channel.RESULTS), p.ResultBatch.of(recs).encode(v))
    assert wait_until(lambda: len(inbox) == 4)
    for topic, payload in inbox:
        dev = topic.split("/")[2]
        assert p.frame_version(payload) == (1 if dev == "old-1" else 2), topic
        if topic.endswith("/ack"):
            assert len(p.Ack.decode(payload).ids) == 5
        else:
            assert p.Answer.decode(payload).error is None
    with bridge.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 10


def test_a_message_the_database_refuses_does_not_hold_back_the_others(
        bridge_on_bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are stored together; if that transaction fails, they are stored apart, and only
    the one the database refuses alone (while it answers) is refused: its records acknowledged
    as rejected, so that its device stops sending them."""
    import cloud_hub.ingest_worker as worker_mod
    from cloud_hub.errors import StoreError

    real = worker_mod.ingest_results

    def refusing(sessions: Any, records: list[p.ResultRecord],
                 replica: str = "hub-0") -> Any:
        if any(r.device == "poison" for r in records):
            raise StoreError("refused by the database")
        return real(sessions, records, replica)

    monkeypatch.setattr(worker_mod, "ingest_results", refusing)
    bridge, bus, inbox = bridge_on_bus
    bridge.ingest.max_wait_s = 0.5  # let all three messages gather into one transaction
    for dev in ("good-1", "poison", "good-2"):
        recs = [record(i, device=dev).model_copy(update={"id": f"{dev}-{i}"}) for i in range(3)]
        bus.publish(p.topic(dev, p.Channel.RESULTS), p.ResultBatch.of(recs).encode())
    assert wait_until(lambda: len(inbox) == 3)
    acks = {t.split("/")[2]: p.Ack.decode(payload) for t, payload in inbox}
    assert sorted(acks["good-1"].ids) == [f"good-1-{i}" for i in range(3)]
    assert sorted(acks["good-2"].ids) == [f"good-2-{i}" for i in range(3)]
    assert acks["poison"].ids == [] and sorted(acks["poison"].rejected) == \
        [f"poison-{i}" for i in range(3)]
    with bridge.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 6
    assert bridge.metrics.registry.get_sample_value(
        "ehi_hub_refused_messages_total", {"channel": "results", "reason": "store"}) == 1


def test_telemetry_older_than_an_update_report_does_not_undo_it(database_url: str) -> None:
    """A heartbeat sent before an install but stored after its report (telemetry waits up to
    half a second, reports do not) leaves the device on the model it reported; a newer
    heartbeat still says what the device runs."""
    from cloud_hub.assignments import record_reported
    from cloud_hub.db import Device
    from cloud_hub.ingest import record_telemetry_many
    from fleet.contract.assignment import Reported, UpdateState

    def telemetry(h: dict[str, Any]) -> p.Telemetry:
        return p.Telemetry.decode(p.encode_json(p.Kind.TELEMETRY, h, 2))

    eng = make_engine(database_url)
    init_db(eng)
    sessions = session_factory(eng)
    try:
        record_telemetry_many(sessions, [("dev-5", telemetry({"ts": 100.0, "model": "m@1"}))])
        record_reported(sessions, "dev-5", Reported("dev-5", "m@2", UpdateState.IDLE, ts=110.0))
        record_telemetry_many(sessions, [("dev-5", telemetry({"ts": 105.0, "model": "m@1"}))])
        with sessions() as s:
            assert s.get(Device, "dev-5").model == "m@2"
        record_telemetry_many(sessions, [("dev-5", telemetry({"ts": 120.0, "model": "m@1"}))])
        with sessions() as s:
            assert s.get(Device, "dev-5").model == "m@1"
    finally:
        eng.dispose()


def test_telemetry_stored_after_an_offline_status_keeps_the_device_offline(
        bridge_on_bus) -> None:
    """Telemetry is stored every half second; the last will that came after it is what the
    device's state ends as."""
    from cloud_hub.db import Device

    bridge, bus, _ = bridge_on_bus
    bus.publish("ehi/v1/dev-9/status", p.status_payload("online", "dev-9"))
    bus.publish("ehi/v1/dev-9/telemetry", p.encode_json(p.Kind.TELEMETRY, {"model": "m@1"}))
    bus.publish("ehi/v1/dev-9/status", p.status_payload("offline", "dev-9"))

    def stored() -> Device | None:
        with bridge.sessions() as s:
            d = s.get(Device, "dev-9")
            return d if d is not None and d.telemetry is not None else None
    assert wait_until(lambda: stored() is not None)
    time.sleep(0.1)
    assert stored().online is False  # type: ignore[union-attr]
