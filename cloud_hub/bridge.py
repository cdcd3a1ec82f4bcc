"""The MQTT bridge: answers offloads with the cloud model and ingests what devices send.

Threads: paho's network thread decodes nothing heavy; it sorts messages into two bounded queues.
The offload worker batches them through the cloud model and publishes the answers; the ingest
worker writes results, telemetry and status to the database and acknowledges results after the
commit. A malformed message or an unknown protocol version is counted and logged, never fatal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import sessionmaker

from cloud_hub.assignments import publish_pending, record_reported
from cloud_hub.errors import StoreError
from cloud_hub.ingest import (
    LateAnswer,
    ingest_hard_examples,
    ingest_results,
    record_status,
    record_telemetry,
)
from cloud_hub.metrics import HubMetrics
from edge_agent.engine import Engine
from edge_agent.errors import InputError
from fleet import protocol as p
from fleet.assignment import Reported
from fleet.batcher import DynamicBatcher
from fleet.errors import ProtocolError, UnsupportedVersion
from fleet.mqtt import MqttConfig, MqttSession, Transport

log = logging.getLogger(__name__)

# Weight of the newest batch-1 inference time in its moving average (the inline fast path).
INFER_EWMA_WEIGHT = 0.1
# After a database error the ingest worker waits this long before it takes the next message,
# so a database outage is not a busy loop. The device resends what was not acknowledged.
STORE_RETRY_S = 1.0
LOG_PAYLOAD_BYTES = 48


@dataclass(frozen=True, slots=True)
class _Incoming:
    device: str
    channel: p.Channel
    payload: bytes


@dataclass(frozen=True, slots=True)
class _Pending:
    device: str
    offload: p.Offload
    received: float


class Bridge:
    def __init__(self, engine: Engine, sessions: sessionmaker, metrics: HubMetrics,
                 *, batch_max: int, batch_wait_ms: float, offload_queue: int, ingest_queue: int,
                 inline_max_ms: float = 0.0,
                 transport_factory: Callable[..., Transport] | None = None,
                 mqtt: MqttConfig | None = None, shared: bool = True) -> None:
        self.engine = engine
        self.sessions = sessions
        self.metrics = metrics
        self.offloads: DynamicBatcher[_Pending] = DynamicBatcher(batch_max, batch_wait_ms / 1e3,
                                                                 offload_queue)
        self.ingest: DynamicBatcher[_Incoming] = DynamicBatcher(1, 0.0, ingest_queue)
        # Inline fast path: with nothing queued and a model that answers one input in under
        # `inline_max_ms`, the network thread answers itself. Each thread hand-off costs more
        # than such a model (a woken thread runs cold); big models always go through the batcher.
        self.inline_max_ms = inline_max_ms
        self._infer_ms_ewma = 0.0
        self._worker_busy = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        subs = [(p.hub_filter(c, shared), p.QOS[c]) for c in
                (p.Channel.OFFLOAD, p.Channel.RESULTS, p.Channel.TELEMETRY, p.Channel.STATUS,
                 p.Channel.HARD, p.Channel.REPORTED)]
        if transport_factory is not None:
            self.transport = transport_factory(self._on_message, subs, self._on_connect)
        else:
            self.transport = MqttSession(mqtt or MqttConfig(), self._on_message, subs,
                                         self._on_connect)
        self.cloud_raw_shape = tuple(engine.manifest.raw_input.shape)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.transport.start()
        for name, fn in (("offload-worker", self._offload_loop),
                         ("ingest-worker", self._ingest_loop)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self.transport.stop()

    @property
    def connected(self) -> bool:
        return self.transport.connected

    def publish_desired(self, topic: str, payload: bytes) -> bool:
        """Publish a desired-model assignment, retained, so an offline device gets it later."""
        return self.transport.publish(topic, payload, qos=1, retain=True)

    def _on_connect(self) -> None:
        # Assignments made while the broker was away go out now (on a thread of their own:
        # this one is paho's, and the database may be slow).
        threading.Thread(target=publish_pending, args=(self.sessions, self.publish_desired),
                         name="publish-pending", daemon=True).start()

    # ------------------------------------------------------------------ MQTT thread

    def _bad(self, reason: str, topic: str, payload: bytes, exc: Exception) -> None:
        self.metrics.bad_messages.labels(reason).inc()
        log.warning("refused a message on %s (%s): %s; payload starts %r", topic, reason, exc,
                    bytes(payload[:LOG_PAYLOAD_BYTES]))

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            device, channel = p.parse_topic(topic)
        except ProtocolError as exc:
            self._bad("topic", topic, payload, exc)
            return
        self.metrics.messages.labels(channel.value).inc()
        if channel is p.Channel.OFFLOAD:
            try:
                off = p.Offload.decode(payload)
            except UnsupportedVersion as exc:
                self._bad("version", topic, payload, exc)
                return
            except ProtocolError as exc:
                self._bad("malformed", topic, payload, exc)
                return
            item = _Pending(device, off, time.time())
            if self._answer_inline():
                self.answer_batch([item])
            elif not self.offloads.offer(item):
                self.metrics.offloads.labels("queue_full").inc()
                self._answer(device, p.Answer(off.id, -1, 0.0, self.engine.manifest.ref,
                                              error="hub busy: offload queue full"))
        elif not self.ingest.offer(_Incoming(device, channel, payload)):
            self.metrics.bad_messages.labels("queue_full").inc()
            log.error("ingest queue full: dropped a %s message of %s (the device resends "
                      "unacknowledged results)", channel.value, device)
        self.metrics.queue_depth.labels("offload").set(len(self.offloads))
        self.metrics.queue_depth.labels("ingest").set(len(self.ingest))

    def _answer_inline(self) -> bool:
        return (self.inline_max_ms > 0 and len(self.offloads) == 0
                and not self._worker_busy.is_set()
                and self._infer_ms_ewma < self.inline_max_ms)

    def _answer(self, device: str, answer: p.Answer) -> None:
        self.transport.publish(p.topic(device, p.Channel.ANSWER), answer.encode(), qos=1)

    # ------------------------------------------------------------------ offload worker

    def _offload_loop(self) -> None:
        while not self._stop.is_set():
            batch = self.offloads.next_batch()
            if batch:
                self._worker_busy.set()
                try:
                    self.answer_batch(batch)
                except Exception:
                    log.exception("offload batch of %d failed", len(batch))
                finally:
                    self._worker_busy.clear()

    def answer_batch(self, batch: list[_Pending]) -> None:
        ok: list[_Pending] = []
        for item in batch:
            shape = item.offload.input.shape
            if shape != self.cloud_raw_shape and shape[1:] != self.cloud_raw_shape:
                self.metrics.offloads.labels("bad_input").inc()
                self._answer(item.device, p.Answer(
                    item.offload.id, -1, 0.0, self.engine.manifest.ref,
                    error=f"input shape {list(shape)} does not fit the cloud model's "
                          f"{list(self.cloud_raw_shape)}"))
            else:
                ok.append(item)
        if not ok:
            return
        self.metrics.batch_size.observe(len(ok))
        t0 = time.perf_counter()
        try:
            x = np.stack([i.offload.input.reshape(self.cloud_raw_shape) for i in ok])
            probs = self.engine.predict_batch(x)
        except InputError as exc:
            for i in ok:
                self.metrics.offloads.labels("bad_input").inc()
                self._answer(i.device, p.Answer(i.offload.id, -1, 0.0, self.engine.manifest.ref,
                                                error=str(exc)))
            return
        dt = time.perf_counter() - t0
        self.metrics.infer_seconds.observe(dt)
        if len(ok) == 1:
            self._infer_ms_ewma += INFER_EWMA_WEIGHT * (dt * 1e3 - self._infer_ms_ewma)
        ref = self.engine.manifest.ref
        for item, pr in zip(ok, probs, strict=True):
            label = int(pr.argmax())
            hub_ms = (time.time() - item.received) * 1000.0
            self._answer(item.device, p.Answer(item.offload.id, label, float(pr[label]), ref,
                                               hub_ms=hub_ms))
            self.metrics.offloads.labels("answered").inc()

    # ------------------------------------------------------------------ ingest worker

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            for item in self.ingest.next_batch():
                try:
                    self.handle_ingest(item)
                except StoreError as exc:
                    self.metrics.store_errors.inc()
                    log.error("database error, %s from %s not stored: %s", item.channel.value,
                              item.device, exc)
                    self._stop.wait(STORE_RETRY_S)
                except Exception:
                    log.exception("ingest of a %s message from %s failed", item.channel.value,
                                  item.device)

    def handle_ingest(self, item: _Incoming) -> None:
        topic = p.topic(item.device, item.channel)
        try:
            if item.channel is p.Channel.RESULTS:
                self._ingest_results(item)
            elif item.channel is p.Channel.HARD:
                self._ingest_hard(item)
            elif item.channel is p.Channel.TELEMETRY:
                h = p.decode_frame(item.payload, p.Kind.TELEMETRY).header
                self._device_gauges(item.device, h)
                if record_telemetry(self.sessions, item.device, h):
                    self.metrics.bad_messages.labels("labels").inc()
            elif item.channel is p.Channel.STATUS:
                h = p.decode_frame(item.payload, p.Kind.STATUS).header
                record_status(self.sessions, item.device, h.get("state") == "online")
            elif item.channel is p.Channel.REPORTED:
                r = Reported.decode(item.payload)
                if r.device != item.device:
                    raise ProtocolError(f"report names device {r.device!r}")
                record_reported(self.sessions, item.device, r)
                self.metrics.update_reports.labels(r.state.value).inc()
        except UnsupportedVersion as exc:
            self._bad("version", topic, item.payload, exc)
        except ProtocolError as exc:
            self._bad("malformed", topic, item.payload, exc)

    def _device_gauges(self, device: str, h: dict[str, Any]) -> None:
        """The device's outbox, offload controller and fidelity, from its telemetry."""
        m = self.metrics
        ob = h.get("outbox")
        if isinstance(ob, dict):
            for key in ("entries", "dropped_full", "dropped_expired"):
                if isinstance(ob.get(key), int | float):
                    m.device_outbox.labels(device, key).set(ob[key])
        off = h.get("offload")
        if isinstance(off, dict):
            for key in ("target", "recent_rate", "threshold", "drift"):
                v = off.get(key)
                if isinstance(v, int | float) and not isinstance(v, bool):
                    m.device_offload.labels(device, key).set(v)
            m.device_drifting.labels(device).set(1 if off.get("drifting") is True else 0)
        fid = h.get("fidelity")
        if isinstance(fid, dict) and isinstance(fid.get("agreement"), int | float):
            m.device_fidelity.labels(device, str(fid.get("backend"))[:32]).set(fid["agreement"])

    def _ingest_results(self, item: _Incoming) -> None:
        good, bad = p.ResultBatch.decode_lenient(item.payload)
        for r in good:
            if r.device != item.device:
                bad[r.id] = f"record names device {r.device!r} but came from {item.device!r}"
        good = [r for r in good if r.id not in bad]
        outcome = ingest_results(self.sessions, good)
        self.metrics.results_inserted.inc(len(outcome.inserted))
        self.metrics.results_duplicate.inc(len(outcome.duplicates))
        if bad:
            self.metrics.results_rejected.inc(len(bad))
            log.warning("refused %d invalid records from %s, e.g. %s", len(bad), item.device,
                        next(iter(bad.items())))
        ack = p.Ack(outcome.committed, bad)
        self.transport.publish(p.topic(item.device, p.Channel.ACK), ack.encode(), qos=1)


    def _ingest_hard(self, item: _Incoming) -> None:
        """Answer hard examples with the cloud model, store them with the answer, then ack."""
        good, bad = p.HardExample.decode_batch(item.payload)
        ok = []
        for ex in good:
            if ex.input.shape != self.cloud_raw_shape:
                bad[ex.id] = (f"input shape {list(ex.input.shape)} does not fit the cloud model's "
                              f"{list(self.cloud_raw_shape)}")
            else:
                ok.append(ex)
        answers: list[LateAnswer] = []
        if ok:
            try:
                probs = self.engine.predict_batch(np.stack([ex.input for ex in ok]))
            except InputError as exc:
                bad.update((ex.id, str(exc)) for ex in ok)
            else:
                ref = self.engine.manifest.ref
                for ex, pr in zip(ok, probs, strict=True):
                    label = int(pr.argmax())
                    answers.append(LateAnswer(ex, label, float(pr[label]), ref))
        outcome = ingest_hard_examples(self.sessions, item.device, answers)
        self.metrics.hard_examples.labels("stored").inc(len(outcome.inserted))
        self.metrics.hard_examples.labels("duplicate").inc(len(outcome.duplicates))
        if bad:
            self.metrics.hard_examples.labels("rejected").inc(len(bad))
            log.warning("refused %d hard examples from %s, e.g. %s", len(bad), item.device,
                        next(iter(bad.items())))
        ack = p.Ack(outcome.committed, bad, of="hard")
        self.transport.publish(p.topic(item.device, p.Channel.ACK), ack.encode(), qos=1)
