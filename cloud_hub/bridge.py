"""The MQTT bridge: routes what devices send to the offload answerer and the ingest worker.

Threads: paho's network thread decodes nothing heavy; it hands offloads to the answerer
(cloud_hub/offloads.py: inline, or queued for its worker), bulk data (results, hard examples)
to the ingest queue and the devices' state (status, reports, telemetry) to the control queue.
Two workers, so that state never waits behind a backlog of results (a rollout waits on
install reports):
- the ingest worker takes every results message waiting (up to BULK_MESSAGES) and stores them
  in one transaction (cloud_hub/ingest.py), then acknowledges each message; hard examples are
  answered late by the cloud model and stored per message;
- the control worker writes status and reports as they come, and every TELEMETRY_FLUSH_S the
  newest telemetry of each device that sent some, all in one transaction (a fleet's heartbeats
  are many small messages; one transaction each cost the hub more than its results).
A malformed message or an unknown protocol version is counted and logged, never fatal.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import sessionmaker

from cloud_hub.assignments import publish_pending, record_reported
from cloud_hub.cloud_model import CloudModel
from cloud_hub.errors import StoreError
from cloud_hub.ingest import (
    LateAnswer,
    ingest_hard_examples,
    ingest_results,
    record_status,
    record_telemetry_many,
)
from cloud_hub.metrics import HubMetrics
from cloud_hub.offloads import OffloadAnswerer
from cloud_hub.rate_limit import RateLimiter
from cloud_hub.roles import ALL_ROLES, channels_of
from fleet.contract import protocol as p
from fleet.contract.assignment import Reported
from fleet.contract.errors import ProtocolError, UnsupportedVersion
from fleet.inference.batcher import DynamicBatcher
from fleet.inference.model import Model
from fleet.transport.mqtt import MqttConfig, MqttSession, Transport

log = logging.getLogger(__name__)

# After a database error the ingest worker waits this long before it takes the next message,
# so a database outage is not a busy loop. The device resends what was not acknowledged.
STORE_RETRY_S = 1.0
# The hub publishes to itself through the broker every HEARTBEAT_S; hearing nothing at all (no
# device, not its own heartbeat) for DEAF_AFTER_HEARTBEATS of them while connected, it is deaf:
# it says so in /readyz and reconnects.
HEARTBEAT_S = 5.0
DEAF_AFTER_HEARTBEATS = 3
# A device over its quota is logged at most this often (every drop is counted).
QUOTA_WARN_EVERY_S = 60.0
# State messages over quota are kept (the newest) and stored at the next tick, not dropped:
# they are not sent again, and a rollout waits on them.
DEFERRED_CHANNELS = frozenset({p.Channel.STATUS, p.Channel.REPORTED})
TICK_S = 1.0
# Results messages the ingest worker stores in one transaction at most, and how long it lets
# them gather after the first (fewer, larger transactions; results are not waited on).
BULK_MESSAGES = 256
BULK_WAIT_S = 0.05
BULK_CHANNELS = frozenset({p.Channel.RESULTS, p.Channel.HARD})
TELEMETRY_FLUSH_S = 0.5
LOG_PAYLOAD_BYTES = 48


@dataclass(frozen=True, slots=True)
class _Incoming:
    device: str
    channel: p.Channel
    payload: bytes


# A results message decoded: the message, its valid records, {id: reason} for the others.
_Decoded = tuple[_Incoming, list[p.ResultRecord], dict[str, str]]


class Bridge:
    def __init__(self, model: Model, sessions: sessionmaker, metrics: HubMetrics,
                 *, batch_max: int, batch_wait_ms: float, offload_queue: int, ingest_queue: int,
                 inline_max_ms: float = 0.0,
                 transport_factory: Callable[..., Transport] | None = None,
                 mqtt: MqttConfig | None = None, shared: bool = True,
                 share_group: str = p.HUB_SHARE_GROUP, replica: str = "hub-0",
                 heartbeat_s: float = HEARTBEAT_S,
                 quotas: dict[p.Channel, tuple[float, int]] | None = None,
                 control_queue: int = 10_000, roles: frozenset[str] = ALL_ROLES) -> None:
        self.model = CloudModel(model)
        self.sessions = sessions
        self.metrics = metrics
        self.offloads = OffloadAnswerer(self.model, metrics, self._answer, batch_max=batch_max,
                                        batch_wait_ms=batch_wait_ms, queue_size=offload_queue,
                                        inline_max_ms=inline_max_ms)
        self.replica = replica
        self.ingest: DynamicBatcher[_Incoming] = DynamicBatcher(BULK_MESSAGES, BULK_WAIT_S,
                                                                ingest_queue)
        self.control: DynamicBatcher[_Incoming] = DynamicBatcher(1, 0.0, control_queue)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.roles = roles
        channels = channels_of(roles)
        subs = [(p.hub_filter(c, shared, share_group), p.QOS[c]) for c in p.Channel
                if c in channels]
        self._heartbeat_topic = p.hub_heartbeat_topic(replica)
        subs.append((self._heartbeat_topic, 0))
        self.heartbeat_s = heartbeat_s
        self._heard = self._connected_at = time.monotonic()
        self.deaf = False
        # Per device and channel (config.DeviceQuota); None: no quotas (unit tests).
        self._quotas = {c: RateLimiter(rate, burst) for c, (rate, burst) in
                        (quotas or {}).items()}
        self._quota_warned: dict[str, float] = {}
        # A device's state (status, reported) over its quota is not dropped but kept, the
        # newest per device and channel, and stored at the next tick: the final state of a
        # burst always arrives, at most one write per tick per device.
        self._deferred: dict[tuple[str, p.Channel], bytes] = {}
        self._deferred_lock = threading.Lock()
        # The newest telemetry of each device since the last flush (control worker).
        self._telemetry: dict[str, bytes] = {}
        # The protocol version each device last wrote: answers and acks go back in it, so
        # agents of the release before (version 1) and of this one share a hub.
        self._wire: dict[str, int] = {}
        if transport_factory is not None:
            self.transport = transport_factory(self._on_message, subs, self._on_connect)
        else:
            self.transport = MqttSession(mqtt or MqttConfig(), self._on_message, subs,
                                         self._on_connect)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.transport.start()
        for name, fn in (("offload-worker", lambda: self.offloads.loop(self._stop)),
                         ("ingest-worker", self._ingest_loop),
                         ("control-worker", self._control_loop),
                         ("broker-heartbeat", self._heartbeat_loop)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop. With `drain_s`, first take no new messages and give the workers that long to
        answer and store what they hold (a replica on SIGTERM): what is still unacknowledged
        after that, devices send again (results, hard examples) or answer at the edge
        (offloads past their deadline)."""
        if drain_s > 0:
            unsubscribe = getattr(self.transport, "unsubscribe_all", None)
            if unsubscribe is not None:
                unsubscribe()
            log.info("stopping: no new messages; finishing the %d held", self._held())
            end = time.monotonic() + drain_s
            while self._held() and time.monotonic() < end:
                time.sleep(0.02)
            self.metrics.queue_depth.labels("ingest").set(len(self.ingest))
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        try:
            self.flush_telemetry()
        except StoreError as exc:
            log.warning("telemetry held at stop not stored: %s", exc)
        self.transport.stop()

    def _held(self) -> int:
        return len(self.ingest) + len(self.control) + len(self.offloads.queue)

    def _queue_for(self, channel: p.Channel) -> DynamicBatcher[_Incoming]:
        return self.ingest if channel in BULK_CHANNELS else self.control

    @property
    def connected(self) -> bool:
        return self.transport.connected

    @property
    def silence_s(self) -> float:
        """Seconds since the last message from the broker."""
        return time.monotonic() - self._heard

    def _flush_deferred(self) -> None:
        with self._deferred_lock:
            items, self._deferred = self._deferred, {}
        for (device, channel), payload in items.items():
            if not self.control.offer(_Incoming(device, channel, payload)):
                with self._deferred_lock:  # try again at the next tick
                    self._deferred.setdefault((device, channel), payload)

    def _heartbeat_loop(self) -> None:
        limit = DEAF_AFTER_HEARTBEATS * self.heartbeat_s
        next_beat = time.monotonic() + self.heartbeat_s
        while not self._stop.wait(min(TICK_S, self.heartbeat_s)):
            self._flush_deferred()
            if not self.transport.connected or time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + self.heartbeat_s
            self.transport.publish(self._heartbeat_topic, b"", qos=0)
            silence = self.silence_s
            self.metrics.broker_silence.set(round(silence, 1))
            if silence > limit and time.monotonic() - self._connected_at > limit:
                self.deaf = True
                self.metrics.broker_deaf.inc()
                log.error("heard nothing from the broker for %.0f s, not even this hub's own "
                          "heartbeat: reconnecting", silence)
                self._connected_at = time.monotonic()
                reconnect = getattr(self.transport, "reconnect", None)
                if reconnect is not None:
                    reconnect()

    def publish_desired(self, topic: str, payload: bytes) -> bool:
        """Publish a desired-model assignment, retained, so an offline device gets it later."""
        return self.transport.publish(topic, payload, qos=p.QOS[p.Channel.DESIRED], retain=True)

    def _on_connect(self) -> None:
        self._connected_at = time.monotonic()
        # Assignments made while the broker was away go out now (on a thread of their own:
        # this one is paho's, and the database may be slow).
        threading.Thread(target=publish_pending, args=(self.sessions, self.publish_desired),
                         name="publish-pending", daemon=True).start()

    # ------------------------------------------------------------------ MQTT thread

    def _refuse(self, topic: str, payload: bytes, exc: ProtocolError) -> None:
        """A message that does not decode: an unknown version or a malformed frame."""
        self._bad("version" if isinstance(exc, UnsupportedVersion) else "malformed", topic,
                  payload, exc)

    def _bad(self, reason: str, topic: str, payload: bytes, exc: Exception) -> None:
        self.metrics.bad_messages.labels(reason).inc()
        log.warning("refused a message on %s (%s): %s; payload starts %r", topic, reason, exc,
                    bytes(payload[:LOG_PAYLOAD_BYTES]))

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._heard = time.monotonic()
        if self.deaf:
            self.deaf = False
            log.info("hearing the broker again")
        if topic == self._heartbeat_topic:
            return
        try:
            device, channel = p.parse_topic(topic)
        except ProtocolError as exc:
            self._bad("topic", topic, payload, exc)
            return
        self.metrics.messages.labels(channel.value).inc()
        # Status and reports are retained: the broker hands the hub copies written before the
        # device's last upgrade, which say nothing of the version it speaks now.
        if channel is not p.Channel.STATUS and channel is not p.Channel.REPORTED:
            v = p.frame_version(payload)
            if v in p.SUPPORTED_VERSIONS:
                self._wire[device] = v
        quota = self._quotas.get(channel)
        if quota is not None and quota.take(device) > 0:
            if channel in DEFERRED_CHANNELS and len(payload) <= p.CHANNEL_MAX_BYTES[channel]:
                with self._deferred_lock:
                    self._deferred[(device, channel)] = payload
            self._over_quota(device, channel)
            return
        limit = p.CHANNEL_MAX_BYTES.get(channel, p.MAX_FRAME_BYTES)
        if len(payload) > limit:
            self._bad("too_large", topic, payload,
                      ProtocolError(f"{len(payload)} bytes, at most {limit} on {channel.value}"))
            return
        if channel is p.Channel.TELEMETRY:
            with self._deferred_lock:
                self._telemetry[device] = payload
            return
        if channel is p.Channel.OFFLOAD:
            try:
                off = p.Offload.decode(payload)
            except ProtocolError as exc:
                self._refuse(topic, payload, exc)
                return
            self.offloads.submit(device, off)
        elif not self._queue_for(channel).offer(_Incoming(device, channel, payload)):
            self.metrics.bad_messages.labels("queue_full").inc()
            log.error("%s queue full: dropped a %s message of %s (the device resends "
                      "unacknowledged results)",
                      "ingest" if channel in BULK_CHANNELS else "control", channel.value, device)
        self.metrics.queue_depth.labels("offload").set(len(self.offloads.queue))
        self.metrics.queue_depth.labels("ingest").set(len(self.ingest))
        self.metrics.queue_depth.labels("control").set(len(self.control))

    def _over_quota(self, device: str, channel: p.Channel) -> None:
        self.metrics.bad_messages.labels("quota").inc()
        now = time.monotonic()
        if now - self._quota_warned.get(device, -math.inf) > QUOTA_WARN_EVERY_S:
            self._quota_warned[device] = now
            log.warning("device %s sends more %s messages than its quota: dropping them "
                        "(counted in ehi_hub_bad_messages_total{reason=\"quota\"})", device,
                        channel.value)

    def _answer(self, device: str, answer: p.Answer) -> None:
        self.transport.publish(p.topic(device, p.Channel.ANSWER),
                               answer.encode(self.wire_version(device)),
                               qos=p.QOS[p.Channel.ANSWER])

    def wire_version(self, device: str) -> int:
        """The version to write to `device` in: the one it last wrote (1 if not known)."""
        return self._wire.get(device, 1)

    # ------------------------------------------------------------------ ingest worker

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            batch = self.ingest.next_batch()
            results = [i for i in batch if i.channel is p.Channel.RESULTS]
            try:
                if results:
                    self._ingest_results(results)
                for item in batch:
                    if item.channel is not p.Channel.RESULTS:
                        self.handle_ingest(item)
            except StoreError as exc:
                self.metrics.store_errors.inc()
                log.error("database error, %d messages not stored (devices send them again): "
                          "%s", len(batch), exc)
                self._stop.wait(STORE_RETRY_S)
            except Exception:
                log.exception("ingest of %d messages failed", len(batch))

    def _control_loop(self) -> None:
        next_flush = time.monotonic() + TELEMETRY_FLUSH_S
        while not self._stop.is_set():
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + TELEMETRY_FLUSH_S
                try:
                    self.flush_telemetry()
                except StoreError as exc:
                    self.metrics.store_errors.inc()
                    log.error("database error, telemetry not stored: %s", exc)
            for item in self.control.next_batch(TELEMETRY_FLUSH_S / 2):
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

    def flush_telemetry(self) -> None:
        """Store the newest telemetry of each device heard since the last flush, at once."""
        with self._deferred_lock:
            held, self._telemetry = self._telemetry, {}
        items: list[tuple[str, dict[str, Any], int | None]] = []
        for device, payload in held.items():
            try:
                f = p.decode_frame(payload, p.Kind.TELEMETRY)
            except ProtocolError as exc:
                self._refuse(p.topic(device, p.Channel.TELEMETRY), payload, exc)
                continue
            self._device_gauges(device, f.header)
            items.append((device, f.header, f.version))
        if items:
            bad = record_telemetry_many(self.sessions, items)
            self.metrics.bad_messages.labels("labels").inc(sum(1 for v in bad.values() if v))

    def handle_ingest(self, item: _Incoming) -> None:
        """Store one hard-examples, status or report message (results are stored together by
        `_ingest_results`; telemetry by `flush_telemetry`)."""
        topic = p.topic(item.device, item.channel)
        try:
            if item.channel is p.Channel.HARD:
                self._ingest_hard(item)
            elif item.channel is p.Channel.STATUS:
                h = p.decode_frame(item.payload, p.Kind.STATUS).header
                record_status(self.sessions, item.device, h.get("state") == "online")
            elif item.channel is p.Channel.REPORTED:
                r = Reported.decode(item.payload)
                if r.device != item.device:
                    raise ProtocolError(f"report names device {r.device!r}")
                record_reported(self.sessions, item.device, r)
                self.metrics.update_reports.labels(r.state.value).inc()
        except ProtocolError as exc:
            self._refuse(topic, item.payload, exc)

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

    def _ingest_results(self, items: list[_Incoming]) -> None:
        """Store the results of several messages in one transaction, then acknowledge each
        message's ids to its device. If that transaction fails, each message is stored alone,
        so that one message the database refuses does not hold back the others (it is not
        acknowledged; its device sends it again)."""
        decoded: list[_Decoded] = []
        for item in items:
            try:
                good, bad = p.ResultBatch.decode_lenient(item.payload)
            except ProtocolError as exc:
                self._refuse(p.topic(item.device, item.channel), item.payload, exc)
                continue
            for r in good:
                if r.device != item.device:
                    bad[r.id] = f"record names device {r.device!r} but came from {item.device!r}"
            decoded.append((item, [r for r in good if r.id not in bad], bad))
        try:
            self._store_results(decoded)
        except StoreError:
            if len(decoded) == 1:
                raise
            log.warning("storing %d results messages at once failed: storing each alone",
                        len(decoded))
            failed: StoreError | None = None
            stored = 0
            for one in decoded:
                try:
                    self._store_results([one])
                    stored += 1
                except StoreError as exc:
                    failed = exc
                    self.metrics.store_errors.inc()
                    log.error("database error, results of %s not stored: %s", one[0].device,
                              exc)
            if failed is not None and not stored:
                raise failed from None  # the database, not a message: wait, then go on

    def _store_results(self, decoded: list[_Decoded]) -> None:
        """One transaction for the decoded messages, then an ack to each; raises StoreError."""
        outcome = ingest_results(self.sessions, [r for _, good, _ in decoded for r in good],
                                 self.replica)
        self.metrics.results_inserted.inc(len(outcome.inserted))
        self.metrics.results_duplicate.inc(len(outcome.duplicates))
        for item, good, bad in decoded:
            if bad:
                self.metrics.results_rejected.inc(len(bad))
                log.warning("refused %d invalid records from %s, e.g. %s", len(bad),
                            item.device, next(iter(bad.items())))
            ack = p.Ack(list(dict.fromkeys(r.id for r in good)), bad)
            self.transport.publish(p.topic(item.device, p.Channel.ACK),
                                   ack.encode(self.wire_version(item.device)),
                                   qos=p.QOS[p.Channel.ACK])

    def _ingest_hard(self, item: _Incoming) -> None:
        """Answer hard examples with the cloud model, store them with the answer, then ack."""
        good, bad = p.HardExample.decode_batch(item.payload)
        answers: list[LateAnswer] = []
        for ex, a in zip(good, self.model.answer([ex.input for ex in good]), strict=True):
            if a.error is not None:
                bad[ex.id] = a.error
            else:
                answers.append(LateAnswer(ex, a.label, a.confidence, self.model.ref))
        outcome = ingest_hard_examples(self.sessions, item.device, answers)
        self.metrics.hard_examples.labels("stored").inc(len(outcome.inserted))
        self.metrics.hard_examples.labels("duplicate").inc(len(outcome.duplicates))
        if bad:
            self.metrics.hard_examples.labels("rejected").inc(len(bad))
            log.warning("refused %d hard examples from %s, e.g. %s", len(bad), item.device,
                        next(iter(bad.items())))
        ack = p.Ack(outcome.committed, bad, of="hard")
        self.transport.publish(p.topic(item.device, p.Channel.ACK),
                               ack.encode(self.wire_version(item.device)),
                               qos=p.QOS[p.Channel.ACK])
