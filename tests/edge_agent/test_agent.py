"""The agent's logic on an in-memory bus, with a fake backend and a scripted hub."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from fleet.contract import protocol as p
from fleet.contract.bundle import load_bundle
from fleet.inference.backends import FakeBackend
from fleet.inference.engine import Engine
from fleet.inference.errors import InputError
from fleet.inference.policy import HardExamplePolicy
from fleet.transport.mqtt import MemoryBus, MemorySession
from models import EDGE_BUNDLE

CONFIDENT = np.array([[10.0] + [0.0] * 9], dtype=np.float32)
UNSURE = np.array([[1.0, 1.0] + [0.0] * 8], dtype=np.float32)
EASY = np.zeros((8, 8), dtype=np.float32)
HARD = np.full((8, 8), 16.0, dtype=np.float32)


def fake_logits(batch: np.ndarray) -> np.ndarray:
    # Bright images are "hard" for the fake edge model.
    return np.concatenate([UNSURE if b.mean() > 0.5 else CONFIDENT for b in batch])


class ScriptedHub:
    """Answers offloads with label 9 and acknowledges results, unless told otherwise."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.answer = True
        self.ack = True
        self.results: list[p.ResultRecord] = []
        self.hard: list[p.HardExample] = []
        self.batches: list[int] = []  # entries per results message
        bus.subscribe(p.hub_filter(p.Channel.OFFLOAD), self._offload)
        bus.subscribe(p.hub_filter(p.Channel.RESULTS), self._results)
        bus.subscribe(p.hub_filter(p.Channel.HARD), self._hard)

    def _hard(self, topic: str, payload: bytes) -> None:
        dev, _ = p.parse_topic(topic)
        good, bad = p.HardExample.decode_batch(payload)
        self.hard.extend(good)
        if self.ack:
            self.bus.publish(p.topic(dev, p.Channel.ACK),
                             p.Ack([e.id for e in good], bad, of="hard").encode())

    def _offload(self, topic: str, payload: bytes) -> None:
        dev, _ = p.parse_topic(topic)
        off = p.Offload.decode(payload)
        if self.answer:
            self.bus.publish(p.topic(dev, p.Channel.ANSWER),
                             p.Answer(off.id, 9, 0.99, "cloud@1").encode())

    def _results(self, topic: str, payload: bytes) -> None:
        dev, _ = p.parse_topic(topic)
        good, bad = p.ResultBatch.decode_lenient(payload)
        self.results.extend(good)
        self.batches.append(len(good) + len(bad))
        if self.ack:
            self.bus.publish(p.topic(dev, p.Channel.ACK),
                             p.Ack([r.id for r in good], bad).encode())


@pytest.fixture
def bus() -> MemoryBus:
    return MemoryBus()


@pytest.fixture
def hub(bus: MemoryBus) -> ScriptedHub:
    return ScriptedHub(bus)


@pytest.fixture
def make_agent(bus: MemoryBus) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(**overrides: Any) -> Agent:
        offload = {"deadline_ms": 100.0, **overrides.pop("offload", {})}
        results = {"flush_interval_s": 0.01, "resend_after_s": 0.2, "store": "memory",
                   **overrides.pop("results", {})}
        settings = AgentSettings(device_id="dev-1", telemetry_interval_s=60, offload=offload,
                                 results=results, **overrides)
        engine = Engine(load_bundle(EDGE_BUNDLE), FakeBackend(fake_logits),
                        HardExamplePolicy("margin", 0.5))
        agent = Agent(settings, engine, functools.partial(_memory, bus))
        agent.start()
        agents.append(agent)
        return agent

    yield make
    for a in agents:
        a.stop()


def _memory(bus: MemoryBus, on_message, subs, on_connect, _will):
    return MemorySession(bus, on_message, subs, on_connect)


def test_easy_input_is_answered_at_the_edge(make_agent: Callable[..., Agent],
                                            hub: ScriptedHub) -> None:
    a = make_agent()
    ans = a.infer(EASY, input_ref="s:1")
    assert (ans.label, ans.source, ans.offloaded, ans.degraded) == (0, "edge", False, False)
    assert ans.label_name == "0"


def test_hard_input_gets_the_cloud_answer(make_agent: Callable[..., Agent],
                                          hub: ScriptedHub) -> None:
    a = make_agent()
    ans = a.infer(HARD)
    assert (ans.label, ans.source, ans.offloaded) == (9, "cloud", True)
    assert a.counters.snapshot()["cloud_answers"] == 1


def test_deadline_passes_and_edge_answer_is_final_and_degraded(
        make_agent: Callable[..., Agent], hub: ScriptedHub) -> None:
    hub.answer = False
    a = make_agent()
    t0 = time.perf_counter()
    ans = a.infer(HARD, deadline_ms=30)
    waited = time.perf_counter() - t0
    assert (ans.label, ans.source, ans.degraded) == (0, "edge_fallback", True)
    assert waited >= 0.03
    assert a.counters.snapshot()["fallbacks"] == 1
    assert len(a.pending) == 0


def test_offline_agent_does_not_wait_for_the_deadline(make_agent: Callable[..., Agent],
                                                      hub: ScriptedHub) -> None:
    a = make_agent()
    a.transport.online = False  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    ans = a.infer(HARD, deadline_ms=5000)
    assert time.perf_counter() - t0 < 1.0
    assert ans.source == "edge_fallback" and ans.degraded


def test_bad_input_is_refused_and_the_agent_goes_on(make_agent: Callable[..., Agent],
                                                    hub: ScriptedHub) -> None:
    a = make_agent()
    with pytest.raises(InputError, match="does not match"):
        a.infer(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(InputError, match="one sample"):
        a.infer(np.zeros((2, 8, 8), dtype=np.float32))
    assert a.counters.snapshot()["input_errors"] == 2
    assert a.infer(EASY).source == "edge"


def test_every_result_reaches_the_hub_once_acknowledged(make_agent: Callable[..., Agent],
                                                        hub: ScriptedHub) -> None:
    a = make_agent()
    for i in range(25):
        a.infer(HARD if i % 5 == 0 else EASY, input_ref=f"s:{i}")
    assert a.drain(5.0)
    assert sorted(int((r.input_ref or "").split(":")[1]) for r in hub.results) == list(range(25))
    assert a.outbox.acked == 25


def test_unacknowledged_results_are_sent_again(make_agent: Callable[..., Agent],
                                               hub: ScriptedHub) -> None:
    hub.ack = False
    a = make_agent()
    a.infer(EASY, input_ref="s:0")
    deadline = time.monotonic() + 3
    while len(hub.results) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(hub.results) >= 2 and {r.id for r in hub.results} == {hub.results[0].id}
    hub.ack = True
    assert a.drain(3.0)


def test_malformed_messages_are_counted_not_fatal(make_agent: Callable[..., Agent],
                                                  bus: MemoryBus, hub: ScriptedHub) -> None:
    a = make_agent()
    bus.publish(p.topic("dev-1", p.Channel.ANSWER), b"garbage")
    bus.publish(p.topic("dev-1", p.Channel.ACK), p.Answer("x", 1, 1.0, "m").encode())
    assert a.counters.snapshot()["bad_messages"] == 2
    assert a.infer(HARD).source == "cloud"


def test_hub_error_answer_falls_back(make_agent: Callable[..., Agent], bus: MemoryBus) -> None:
    def refuse(topic: str, payload: bytes) -> None:
        off = p.Offload.decode(payload)
        bus.publish(p.topic("dev-1", p.Channel.ANSWER),
                    p.Answer(off.id, -1, 0.0, "cloud@1", error="busy").encode())

    bus.subscribe(p.hub_filter(p.Channel.OFFLOAD), refuse)
    a = make_agent()
    ans = a.infer(HARD)
    assert ans.source == "edge_fallback" and a.counters.snapshot()["hub_errors"] == 1


def test_status_online_retained_and_telemetry(make_agent: Callable[..., Agent],
                                              bus: MemoryBus, hub: ScriptedHub) -> None:
    a = make_agent(labels={"site": "lab"})
    status = p.decode_frame(bus.retained[p.topic("dev-1", p.Channel.STATUS)]).header
    assert status["state"] == "online"
    t = a.telemetry()
    assert t["model"] == "digits-edge@1" and t["labels"] == {"site": "lab"}
    assert "cpu_percent" in t["system"] and "rss_mb" in t["system"]
    assert set(t["queues"]) == {"offloads_pending", "outbox"}
    assert t["outbox"]["results_produced"] == 0 and t["outbox"]["dropped_full"] == 0
    a.publish_telemetry()
    assert any(tp.endswith("/telemetry") for tp, _ in bus.log)


def test_batch_answers_in_order_with_one_model_call(make_agent: Callable[..., Agent],
                                                   hub: ScriptedHub) -> None:
    a = make_agent()
    batch = np.stack([EASY, HARD, EASY, HARD])
    calls = a.engine.backend.calls  # type: ignore[attr-defined]
    answers = a.infer_batch(batch, input_refs=["b:0", "b:1", "b:2", "b:3"])
    assert a.engine.backend.calls == calls + 1  # type: ignore[attr-defined]
    assert [x.source for x in answers] == ["edge", "cloud", "edge", "cloud"]
    assert [x.label for x in answers] == [0, 9, 0, 9]
    assert a.drain(5.0) and sorted(r.input_ref or "" for r in hub.results) == [
        "b:0", "b:1", "b:2", "b:3"]


def test_batch_waits_one_deadline_not_one_per_input(make_agent: Callable[..., Agent],
                                                    hub: ScriptedHub) -> None:
    hub.answer = False
    a = make_agent()
    t0 = time.perf_counter()
    answers = a.infer_batch(np.stack([HARD] * 5), deadline_ms=50)
    assert time.perf_counter() - t0 < 0.2
    assert all(x.source == "edge_fallback" for x in answers)


def test_offload_carries_the_request_deadline(make_agent: Callable[..., Agent],
                                              bus: MemoryBus, hub: ScriptedHub) -> None:
    a = make_agent()
    a.infer(HARD, deadline_ms=77)
    sent = [p.Offload.decode(b) for t, b in bus.log if t.endswith("/offload")]
    assert sent[-1].deadline_ms == pytest.approx(77)


def test_offline_agent_with_a_backlog_does_not_spin(make_agent: Callable[..., Agent],
                                                     hub: ScriptedHub) -> None:
    a = make_agent()
    a.transport.online = False  # type: ignore[attr-defined]
    for _ in range(300):  # more than results.batch_max, all pending
        a.infer(EASY)
    cpu0, t0 = time.process_time(), time.monotonic()
    time.sleep(0.5)
    used = (time.process_time() - cpu0) / (time.monotonic() - t0)
    assert used < 0.2, f"the agent burned {used:.0%} of a core while idle and offline"
    a.transport.online = True  # type: ignore[attr-defined]
    assert a.drain(5.0)


def test_hard_inputs_without_a_cloud_answer_are_kept_for_a_late_one(
        make_agent: Callable[..., Agent], hub: ScriptedHub) -> None:
    hub.answer = False
    a = make_agent()
    late = a.infer(HARD, deadline_ms=20)
    a.transport.online = False  # type: ignore[attr-defined]
    offline = a.infer(HARD)
    a.infer(EASY)  # easy inputs owe the cloud nothing
    assert a.counters.snapshot()["late_queued"] == 2
    a.transport.online = True  # type: ignore[attr-defined]
    a._on_connect()
    assert a.drain(5.0)
    reasons = {e.id: e.reason for e in hub.hard}
    assert reasons == {late.id: "deadline", offline.id: "offline"}
    np.testing.assert_array_equal(hub.hard[0].input, HARD)
    assert a.outbox.stats().hard_acked == 2


def test_late_answers_can_be_turned_off(make_agent: Callable[..., Agent],
                                        hub: ScriptedHub) -> None:
    hub.answer = False
    a = make_agent(offload={"deadline_ms": 10.0, "late_answers": False})
    a.infer(HARD)
    assert a.drain(5.0) and hub.hard == [] and len(hub.results) == 1


def test_a_backlog_drains_at_the_configured_rate(make_agent: Callable[..., Agent],
                                                 hub: ScriptedHub) -> None:
    a = make_agent(results={"flush_interval_s": 3600, "drain_rate": 100, "batch_max": 50})
    a.transport.online = False  # type: ignore[attr-defined]
    for _ in range(400):
        a.infer(EASY)
    a.transport.online = True  # type: ignore[attr-defined]
    a.outbox.maintain()
    t0 = time.monotonic()
    sent = a.sender.flush()
    # A burst of half a second's worth, then the bucket is empty: no flood after an outage.
    assert sent == 50 and hub.batches == [50]
    again = a.sender.flush()
    assert again <= 100 * (time.monotonic() - t0) + 1  # only what the rate allowed since
    time.sleep(0.6)
    assert a.sender.flush() == 50  # the bucket holds at most a burst


def test_settings_refuse_labels_a_selector_could_not_name() -> None:
    from edge_agent.config import load_settings
    from edge_agent.errors import ConfigError

    assert load_settings(device_id="cam-1", labels={"site": "berlin"}).labels == {"site": "berlin"}
    with pytest.raises(ConfigError, match=r"labels.*two words"):
        load_settings(device_id="cam-1", labels={"site": "two words"})


def test_offload_budget_from_settings_and_from_the_hub(bus: MemoryBus, hub: ScriptedHub) -> None:
    from fleet.contract.assignment import OffloadTarget
    from models import STREAMS_FILE

    engine = Engine.open(EDGE_BUNDLE, "onnxruntime")
    settings = AgentSettings(device_id="dev-1", telemetry_interval_s=60,
                             offload={"deadline_ms": 100.0, "mode": "budget", "target": 0.3},
                             results={"store": "memory", "flush_interval_s": 0.01})
    a = Agent(settings, engine, functools.partial(_memory, bus))
    a.start()
    try:
        st = a.offload_state()
        assert st["mode"] == "budget" and st["target"] == 0.3
        x = np.load(STREAMS_FILE)["shifted_x"]
        answers = [a.infer(xi) for xi in x[:300]]
        assert abs(np.mean([ans.offloaded for ans in answers[100:]]) - 0.3) <= 0.05
        t = a.telemetry()
        assert t["offload"]["mode"] == "budget" and t["fidelity"]["faithful"]
        # The hub's setting wins: a fixed threshold (the calibrated one) ...
        a.set_offload(OffloadTarget("threshold"))
        assert a.offload_state()["mode"] == "threshold"
        assert engine.policy.threshold == engine.base_threshold
        assert a.offload_state()["source"] == "calibrated"
        # ... or another target; None gives the agent's own settings back.
        a.set_offload(OffloadTarget("budget", 0.1))
        assert a.offload_state()["target"] == 0.1
        a.set_offload(None)
        assert a.offload_state()["target"] == 0.3
    finally:
        a.stop()


def test_while_the_hub_is_gone_hard_inputs_are_answered_at_once_and_health_says_so(
        make_agent: Callable[..., Agent], hub: ScriptedHub) -> None:
    """After three offloads in a row went unanswered, the agent takes the hub as unreachable:
    hard inputs get the edge answer without waiting their deadline (one probe a second still
    goes out), /healthz says degraded, and the first answer brings the hub back."""
    hub.answer = hub.ack = False  # gone: neither answers nor acknowledgements
    a = make_agent(offload={"deadline_ms": 300.0})
    for _ in range(3):
        assert a.infer(HARD).source == "edge_fallback"
    h = a.health()
    assert h["status"] == "degraded" and h["hub"]["reachable"] is False
    assert h["broker"]["connected"] is True and h["hub"]["unanswered"] == 3
    a.hub._probe_at = time.monotonic()  # the next probe is a second away
    t0 = time.perf_counter()
    ans = a.infer(HARD)
    assert ans.source == "edge_fallback" and time.perf_counter() - t0 < 0.25
    hub.answer = hub.ack = True
    a.hub._probe_at = 0.0  # a probe is due: it goes out and is answered
    assert a.infer(HARD).source == "cloud"
    assert a.health()["status"] == "ok" and a.health()["hub"]["last_heard_s"] is not None
    assert a.drain(5.0)  # every result, and the hard examples owed, reach the hub
    assert len(hub.hard) >= 4
