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

from sqlalchemy.orm import sessionmaker

from cloud_hub.assignments import publish_pending
from cloud_hub.broker_heartbeat import DEAF_AFTER_HEARTBEATS, HEARTBEAT_S, BrokerHeartbeat
from cloud_hub.cloud_model import CloudModel
from cloud_hub.control_worker import ControlWorker
from cloud_hub.ingest_worker import Incoming, IngestWorker
from cloud_hub.metrics import HubMetrics
from cloud_hub.offloads import OffloadAnswerer
from cloud_hub.rate_limit import RateLimiter
from cloud_hub.refusals import Refusals
from cloud_hub.roles import ALL_ROLES, channels_of
from cloud_hub.supervisor import STALL_S, Worker, problems
from fleet.contract import protocol as p
from fleet.contract.errors import ProtocolError
from fleet.inference.batcher import DynamicBatcher
from fleet.inference.model import Model
from fleet.transport.mqtt import MqttConfig, MqttSession, Transport

log = logging.getLogger(__name__)

__all__ = ["DEAF_AFTER_HEARTBEATS", "HEARTBEAT_S", "Bridge"]

# A device over its quota is logged at most this often (every drop is counted).
QUOTA_WARN_EVERY_S = 60.0
# State messages over quota are kept (the newest) and stored at the next tick, not dropped:
# they are not sent again, and a rollout waits on them.
DEFERRED_CHANNELS = frozenset({p.Channel.STATUS, p.Channel.REPORTED})
BULK_CHANNELS = frozenset({p.Channel.RESULTS, p.Channel.HARD})


class Bridge:
    def __init__(self, model: Model, sessions: sessionmaker, metrics: HubMetrics,
                 *, batch_max: int, batch_wait_ms: float, offload_queue: int, ingest_queue: int,
                 inline_max_ms: float = 0.0,
                 transport_factory: Callable[..., Transport] | None = None,
                 mqtt: MqttConfig | None = None, shared: bool = True,
                 share_group: str = p.HUB_SHARE_GROUP, replica: str = "hub-0",
                 heartbeat_s: float = HEARTBEAT_S,
                 quotas: dict[p.Channel, tuple[float, int]] | None = None,
                 control_queue: int = 10_000, roles: frozenset[str] = ALL_ROLES,
                 stall_s: float = STALL_S) -> None:
        self.model = CloudModel(model)
        self.sessions = sessions
        self.metrics = metrics
        self.refusals = Refusals(metrics)
        self.offloads = OffloadAnswerer(self.model, metrics, self._answer, batch_max=batch_max,
                                        batch_wait_ms=batch_wait_ms, queue_size=offload_queue,
                                        inline_max_ms=inline_max_ms)
        self.replica = replica
        self.ingest_worker = IngestWorker(sessions, self.model, metrics, self.refusals,
                                          self._send_ack, replica, ingest_queue)
        self.control_worker = ControlWorker(sessions, metrics, self.refusals, control_queue)
        self._stop = threading.Event()
        self.roles = roles
        channels = channels_of(roles)
        subs = [(p.hub_filter(c, shared, share_group), p.QOS[c]) for c in p.Channel
                if c in channels]
        self._heartbeat_topic = p.hub_heartbeat_topic(replica)
        subs.append((self._heartbeat_topic, 0))
        # Per device and channel (config.DeviceQuota); None: no quotas (unit tests).
        self._quotas = {c: RateLimiter(rate, burst) for c, (rate, burst) in
                        (quotas or {}).items()}
        self._quota_warned: dict[str, float] = {}
        # The protocol version each device last wrote: answers and acks go back in it, so
        # agents of the release before (version 1) and of this one share a hub.
        self._wire: dict[str, int] = {}
        if transport_factory is not None:
            self.transport = transport_factory(self._on_message, subs, self._on_connect)
        else:
            self.transport = MqttSession(mqtt or MqttConfig(), self._on_message, subs,
                                         self._on_connect)
        self.heartbeat = BrokerHeartbeat(self.transport, self._heartbeat_topic, metrics,
                                         heartbeat_s)
        self.workers = [
            Worker("offload-worker", self.offloads.step, self._stop, metrics,
                   waiting=lambda: len(self.offloads.queue), stall_s=stall_s),
            Worker("ingest-worker", self.ingest_worker.step, self._stop, metrics,
                   waiting=lambda: len(self.ingest_worker.queue), stall_s=stall_s),
            Worker("control-worker", self.control_worker.step, self._stop, metrics,
                   waiting=self.control_worker.held, stall_s=stall_s),
            Worker("broker-heartbeat", self.heartbeat.step, self._stop, metrics,
                   stall_s=stall_s),
        ]

    @property
    def ingest(self) -> DynamicBatcher[Incoming]:
        """The ingest worker's queue."""
        return self.ingest_worker.queue

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.transport.start()
        for w in self.workers:
            w.start()

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
            self.metrics.queue_depth.labels("ingest").set(len(self.ingest_worker.queue))
        self._stop.set()
        for w in self.workers:
            w.join(timeout=5)
        try:
            self.control_worker.flush_telemetry()
        except Exception as exc:
            log.warning("telemetry held at stop not stored: %s", exc)
        self.transport.stop()

    def _held(self) -> int:
        return len(self.ingest_worker.queue) + len(self.control_worker.queue) + \
            len(self.offloads.queue)

    def worker_problems(self) -> dict[str, str]:
        """{worker: what is wrong} for each worker that has ended or stalled (for /readyz)."""
        return problems(self.workers, self.metrics)

    @property
    def connected(self) -> bool:
        return self.transport.connected

    @property
    def deaf(self) -> bool:
        return self.heartbeat.deaf

    @property
    def silence_s(self) -> float:
        """Seconds since the last message from the broker."""
        return self.heartbeat.silence_s

    def publish_desired(self, topic: str, payload: bytes) -> bool:
        """Publish a desired-model assignment, retained, so an offline device gets it later."""
        return self.transport.publish(topic, payload, qos=p.QOS[p.Channel.DESIRED], retain=True)

    def _on_connect(self) -> None:
        self.heartbeat.connected()
        # Assignments made while the broker was away go out now (on a thread of their own:
        # this one is paho's, and the database may be slow).
        threading.Thread(target=publish_pending, args=(self.sessions, self.publish_desired),
                         name="publish-pending", daemon=True).start()

    # ------------------------------------------------------------------ MQTT thread

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            self._route(topic, payload)
        except Exception as exc:
            log.exception("routing a message on %r failed", topic[:200])
            self.refusals.refuse("?", "?", "internal", exc, payload)

    def _route(self, topic: str, payload: bytes) -> None:
        self.heartbeat.heard()
        if topic == self._heartbeat_topic:
            return
        try:
            device, channel = p.parse_topic(topic)
        except ProtocolError as exc:
            self.refusals.refuse("?", "topic", "topic", exc, payload)
            return
        self.metrics.messages.labels(channel.value).inc()
        if channel not in p.FROM_DEVICE:
            self.refusals.refuse(device, channel.value, "direction",
                                 "a channel the hub writes, not reads", payload)
            return
        quota = self._quotas.get(channel)
        if quota is not None and quota.take(device) > 0:
            if channel in DEFERRED_CHANNELS and len(payload) <= p.CHANNEL_MAX_BYTES[channel]:
                self.control_worker.defer(device, channel, payload)
            self._over_quota(device, channel)
            return
        limit = p.CHANNEL_MAX_BYTES.get(channel, p.MAX_FRAME_BYTES)
        if len(payload) > limit:
            self.refusals.refuse(device, channel.value, "too_large",
                                 f"{len(payload)} bytes, at most {limit} on {channel.value}",
                                 payload)
            return
        # Status and reports are retained: the broker hands the hub copies written before the
        # device's last upgrade, which say nothing of the version it speaks now.
        if channel is not p.Channel.STATUS and channel is not p.Channel.REPORTED:
            v = p.frame_version(payload)
            if v in p.SUPPORTED_VERSIONS:
                self._wire[device] = v
        if channel is p.Channel.TELEMETRY:
            self.control_worker.hold_telemetry(device, payload)
            return
        if channel is p.Channel.OFFLOAD:
            try:
                off = p.Offload.decode(payload)
            except ProtocolError as exc:
                self.refusals.refuse(device, channel.value, exc.reason, exc, payload)
                return
            self.offloads.submit(device, off)
        else:
            bulk = channel in BULK_CHANNELS
            q = self.ingest_worker.queue if bulk else self.control_worker.queue
            if not q.offer(Incoming(device, channel, payload)):
                self.metrics.bad_messages.labels("queue_full").inc()
                self.metrics.refused.labels(channel.value, "queue_full").inc()
                log.error("%s queue full: dropped a %s message of %s (the device resends "
                          "unacknowledged results)", "ingest" if bulk else "control",
                          channel.value, device)
        self.metrics.queue_depth.labels("offload").set(len(self.offloads.queue))
        self.metrics.queue_depth.labels("ingest").set(len(self.ingest_worker.queue))
        self.metrics.queue_depth.labels("control").set(len(self.control_worker.queue))

    def _over_quota(self, device: str, channel: p.Channel) -> None:
        self.metrics.bad_messages.labels("quota").inc()
        self.metrics.refused.labels(channel.value, "quota").inc()
        now = time.monotonic()
        if now - self._quota_warned.get(device, -math.inf) > QUOTA_WARN_EVERY_S:
            if len(self._quota_warned) > 10_000:
                self._quota_warned.clear()
            self._quota_warned[device] = now
            log.warning("device %s sends more %s messages than its quota: dropping them "
                        "(counted in ehi_hub_bad_messages_total{reason=\"quota\"})", device,
                        channel.value)

    def _answer(self, device: str, answer: p.Answer) -> None:
        self.transport.publish(p.topic(device, p.Channel.ANSWER),
                               answer.encode(self.wire_version(device)),
                               qos=p.QOS[p.Channel.ANSWER])

    def _send_ack(self, device: str, ack: p.Ack) -> None:
        self.transport.publish(p.topic(device, p.Channel.ACK),
                               ack.encode(self.wire_version(device)), qos=p.QOS[p.Channel.ACK])

    def wire_version(self, device: str) -> int:
        """The version to write to `device` in: the one it last wrote (1 if not known)."""
        return self._wire.get(device, 1)
