"""The agent: answers inputs locally, offloads hard ones, and reports every decision to the hub.

Threads: the caller's (or the local API's) threads run `infer`; paho's network thread delivers
answers and acks; one sender thread (edge_agent/sender.py) batches result records; one thread
sends telemetry.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import NO_BUNDLE, AgentSettings
from edge_agent.errors import AgentBusy, ConfigError
from edge_agent.hub_liveness import HubLiveness
from edge_agent.offload import PendingOffloads
from edge_agent.offload_budget import OffloadController
from edge_agent.outbox import Outbox, OutboxFull, OutboxLimits
from edge_agent.outbox_store import EntryKind, MemoryStore, SqliteStore, Store
from edge_agent.sender import ResultSender
from edge_agent.slots import ModelSlots
from edge_agent.telemetry import TelemetrySampler
from edge_agent.update_rules import DeviceProfile
from edge_agent.updater import Updater, UpdaterConfig, resolve_startup
from fleet.contract import protocol as p
from fleet.contract.assignment import OffloadTarget, Reported
from fleet.contract.errors import ProtocolError
from fleet.inference.backends import available_backends
from fleet.inference.batcher import DynamicBatcher
from fleet.inference.engine import Engine, LocalResult
from fleet.inference.errors import InputError
from fleet.inference.policy import CONFIDENCE_POLICIES
from fleet.transport.mqtt import MqttSession, Transport, Will

log = logging.getLogger(__name__)


TransportFactory = Callable[[Callable[[str, bytes], None], list[tuple[str, int]],
                             Callable[[], None], Will], Transport]


@dataclass(slots=True)
class InferenceAnswer:
    """What the agent answers its application. (Not frozen: a frozen dataclass's
    constructor costs 0.5 us more, on every input.)"""

    id: str
    label: int
    label_name: str
    confidence: float
    source: p.Source
    degraded: bool
    offloaded: bool
    latency_ms: float
    model: str = ""  # name@version of the edge model that answered

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "label_name": self.label_name,
                "confidence": self.confidence, "source": self.source, "degraded": self.degraded,
                "offloaded": self.offloaded, "latency_ms": self.latency_ms, "model": self.model}


@dataclass(slots=True)
class _Request:
    raw: np.ndarray
    input_ref: str | None
    deadline_ms: float | None
    done: threading.Event = field(default_factory=threading.Event)
    answer: InferenceAnswer | None = None
    error: Exception | None = None


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, int] = dict.fromkeys(
            ("inputs", "offloaded", "cloud_answers", "fallbacks", "input_errors",
             "offload_busy", "bad_messages", "hub_errors", "late_queued", "outbox_full",
             "connections_refused"), 0)

    def inc(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.values[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.values)


def open_outbox(settings: AgentSettings) -> Outbox:
    rs = settings.results
    store: Store = (SqliteStore(settings.outbox_path(), rs.fsync) if rs.store == "sqlite"
                    else MemoryStore())
    return Outbox(store, OutboxLimits(rs.max_entries, rs.max_bytes, rs.max_age_s, rs.on_full),
                  rs.resend_after_s, rs.resend_max_s)


class Agent:
    def __init__(self, settings: AgentSettings, engine: Engine | None = None,
                 transport_factory: TransportFactory | None = None) -> None:
        self.settings = settings
        self.device = settings.device_id
        self.slots: ModelSlots | None = None
        bundle = settings.bundle
        if settings.update.enabled:
            self.slots = ModelSlots(settings.models_path())
            bundle = resolve_startup(self.slots, settings.bundle, settings.update.keys()[0]).bundle
        if engine is None:
            if bundle is None:
                raise ConfigError(NO_BUNDLE)
            engine = self.open_engine(bundle)
        self.engine = engine
        # The hub's offload setting for this device (from its assignment), over the settings'.
        self._offload_override: OffloadTarget | None = None
        self._budget: tuple[Engine, OffloadController] | None = None
        # Held while a decision updates the threshold and while the offload setting changes:
        # a request finishing on the old controller must not write its threshold after.
        self._offload_lock = threading.Lock()
        self._configure_offload(self.engine)
        self.pending = PendingOffloads(settings.offload.max_pending)
        self.hub = HubLiveness()
        self.outbox = open_outbox(settings)
        self.counters = Counters()
        tp = settings.throughput
        self._batcher: DynamicBatcher[_Request] | None = (
            DynamicBatcher(tp.max_batch, tp.max_wait_ms / 1000.0, tp.max_queue)
            if tp.mode == "batch" else None)
        self._seq = itertools.count()
        # Record (and offload) ids: a random 64-bit prefix drawn at start, then a counter.
        # Unique across the fleet and restarts like a UUID, but a batch's ids share their
        # prefix and compress to a few bytes each on the wire (results and acks).
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._topics = {c: p.topic(self.device, c) for c in p.Channel}
        will = Will(self._topics[p.Channel.STATUS],
                    p.status_payload("offline", self.device, settings.wire_version))
        subs = [(self._topics[c], p.QOS[c]) for c in (p.Channel.ANSWER, p.Channel.ACK)]
        self.updater: Updater | None = None
        if self.slots is not None:
            subs.append((self._topics[p.Channel.DESIRED], p.QOS[p.Channel.DESIRED]))
            self.updater = self._make_updater(self.slots)
        factory = transport_factory or self._mqtt_factory
        self.transport = factory(self._on_message, subs, self._on_connect, will)
        self.wire_version = settings.wire_version
        self.sender = ResultSender(settings.results, self.outbox, self.transport,
                                   self._topics.__getitem__, self.wire_version)
        self._telemetry = TelemetrySampler()
        self.started_at = time.time()

    @property
    def model_ref(self) -> str:
        return self.engine.manifest.ref

    def open_engine(self, bundle: Path) -> Engine:
        s = self.settings
        return Engine.open(bundle, s.backend, s.threads, s.policy, s.threshold,
                           options=s.backend_options(), fidelity=s.fidelity)

    def _make_updater(self, slots: ModelSlots) -> Updater:
        u = self.settings.update
        trusted, hub_keys = u.keys()
        runtimes = (available_backends() if self.settings.backend == "auto"
                    else [self.settings.backend])
        profile = DeviceProfile(self.device, tuple(u.hardware), tuple(runtimes),
                                u.max_bundle_bytes)
        assert u.hub_url is not None  # the settings validator insists
        cfg = UpdaterConfig(u.hub_url, trusted, hub_keys, profile, u.download_rate)
        return Updater(cfg, slots, open_engine=self.open_engine, swap=self._swap,
                       running=lambda: self.engine, report=self._publish_report,
                       on_offload=self.set_offload)

    def _swap(self, engine: Engine) -> None:
        """Serve new requests with `engine`. Requests in flight hold the old engine and finish
        on it; the old model is freed when the last of them lets go of it."""
        self._configure_offload(engine)
        self.engine = engine

    # ------------------------------------------------------------------ offload budget

    def set_offload(self, target: OffloadTarget | None) -> None:
        """Apply the hub's offload setting for this device (None: back to the settings')."""
        if target == self._offload_override:
            return
        self._offload_override = target
        log.info("offload setting from the hub: %s", target or "none (the agent's settings)")
        self._configure_offload(self.engine)

    def _configure_offload(self, engine: Engine) -> None:
        """Start (or stop) the offload controller for `engine` as the settings say."""
        with self._offload_lock:
            self._configure_offload_locked(engine)

    def _configure_offload_locked(self, engine: Engine) -> None:
        o, hub = self.settings.offload, self._offload_override
        mode = hub.mode if hub is not None else o.mode
        target = (hub.target if hub is not None and hub.target is not None else o.target)
        cap = hub.max_bytes_per_s if hub is not None else o.max_bytes_per_s
        engine.policy.threshold = engine.base_threshold
        if mode != "budget":
            self._budget = None
            return
        spec = engine.manifest.fidelity
        if target is None and spec is not None:
            target = spec.offload_budget
        if target is None or engine.policy.name not in CONFIDENCE_POLICIES:
            log.warning("offload mode 'budget' needs a target share (offload.target; bundle %s "
                        "states no offload budget) and a confidence policy (have %s): "
                        "keeping the fixed threshold", engine.manifest.ref, engine.policy.name)
            self._budget = None
            return
        ctl = OffloadController(target, engine.base_threshold, engine.calibration_scores,
                                max_bytes_per_s=cap)
        engine.policy.threshold = ctl.threshold
        self._budget = (engine, ctl)
        log.info("offload budget: %.1f%% of inputs%s, starting at threshold %.4g", 100 * target,
                 f", at most {cap:g} bytes/s" if cap else "", ctl.threshold)

    def offload_state(self) -> dict[str, Any]:
        """The offload mode, target, threshold and drift (telemetry and the local API)."""
        b = self._budget
        if b is not None:
            return b[1].state().to_dict()
        e = self.engine
        return {"mode": "threshold", "threshold": e.policy.threshold,
                "source": e.threshold_source}

    def _observe(self, engine: Engine, local: LocalResult, offload_bytes: int) -> None:
        if self._budget is None:
            return
        with self._offload_lock:
            b = self._budget
            if b is not None and b[0] is engine:
                engine.policy.threshold = b[1].observe(local.score, local.hard, offload_bytes)

    def _publish_report(self, report: Reported) -> None:
        self.transport.publish(self._topics[p.Channel.REPORTED],
                               report.encode(self.wire_version),
                               qos=p.QOS[p.Channel.REPORTED], retain=True)

    def _mqtt_factory(self, on_message: Callable[[str, bytes], None],
                      subs: list[tuple[str, int]], on_connect: Callable[[], None],
                      will: Will) -> Transport:
        cfg = self.settings.mqtt.session_config(f"agent-{self.device}", will)
        return MqttSession(cfg, on_message, subs, on_connect)

    # ------------------------------------------------------------------ lifecycle

    def start(self, wait_connected_s: float = 0.0) -> None:
        self.transport.start()
        if wait_connected_s > 0 and not self.transport.wait_connected(wait_connected_s):
            log.warning("no broker connection after %.1f s; answering locally until it comes",
                        wait_connected_s)
        if self.updater is not None:
            self.updater.start()
        loops: list[tuple[str, Callable[[], None]]] = [
            ("results-sender", lambda: self.sender.loop(self._stop)),
            ("telemetry", self._telemetry_loop)]
        if self._batcher is not None:
            loops.append(("batcher", self._batch_loop))
        for name, fn in loops:
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("agent %s running %s on %s, policy %r", self.device, self.model_ref,
                 self.engine.backend.name, self.engine.policy)

    def drain(self, timeout_s: float) -> bool:
        """Wait until the hub acknowledged every result record."""
        return self.outbox.wait_empty(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        if self.updater is not None:
            self.updater.stop()
        self.outbox.poke()  # the sender may be asleep waiting for a change
        for t in self._threads:
            t.join(timeout=5)
        self.transport.stop(final=(self._topics[p.Channel.STATUS],
                                   p.status_payload("offline", self.device, self.wire_version), 1,
                                   True))
        self.sender.apply_acks()  # what the hub acknowledged last need not be sent again
        self.engine.close()
        self.outbox.close()

    # ------------------------------------------------------------------ inference

    def infer(self, raw: np.ndarray, input_ref: str | None = None,
              deadline_ms: float | None = None) -> InferenceAnswer:
        """Answer one input: locally, or from the cloud when the policy says it is hard.

        Raises InputError for an input the bundle does not accept; the agent keeps running.
        """
        t0 = time.perf_counter()
        engine = self.engine  # a model update swaps self.engine; this request stays on its model
        deadline_s = self._deadline_s(deadline_ms)
        try:
            local = engine.run(raw)
        except InputError:
            self.counters.inc("input_errors")
            raise
        self.counters.inc("inputs")
        rid = self._new_id()
        if not local.hard:
            return self._finish(engine, rid, raw, local, None, 0, t0, input_ref)
        sent = self._offload_send(engine, rid, raw, local, deadline_s)
        answer = self.pending.wait(rid, deadline_s) if sent else None
        if sent and answer is None:
            self.hub.missed()
        return self._finish(engine, rid, raw, local, answer, sent, t0, input_ref)

    def infer_batch(self, raws: np.ndarray, input_refs: list[str | None] | None = None,
                    deadline_ms: float | None = None) -> list[InferenceAnswer]:
        """Answer a batch [N, *raw_input] with one model call.

        The batch's hard inputs are all offloaded first and then awaited against one deadline.
        """
        t0 = time.perf_counter()
        engine = self.engine
        deadline_s = self._deadline_s(deadline_ms)
        try:
            locals_ = engine.run_batch(raws)
        except InputError:
            self.counters.inc("input_errors")
            raise
        self.counters.inc("inputs", len(locals_))
        refs = input_refs or [None] * len(locals_)
        rids = [self._new_id() for _ in locals_]
        sent = [self._offload_send(engine, rid, raws[i], loc, deadline_s) if loc.hard else 0
                for i, (rid, loc) in enumerate(zip(rids, locals_, strict=True))]
        end = t0 + deadline_s
        out = []
        for i, (rid, loc, nbytes, ref) in enumerate(zip(rids, locals_, sent, refs, strict=True)):
            answer = (self.pending.wait(rid, max(0.0, end - time.perf_counter()))
                      if nbytes else None)
            if nbytes and answer is None:
                self.hub.missed()
            out.append(self._finish(engine, rid, raws[i], loc, answer, nbytes, t0, ref))
        return out

    def submit(self, raw: np.ndarray, input_ref: str | None = None,
               deadline_ms: float | None = None) -> InferenceAnswer:
        """Answer one input the way the throughput settings say: at once, or in a batch.

        Raises InputError for a bad input, AgentBusy when the batch queue is full.
        """
        if self._batcher is None:
            return self.infer(raw, input_ref, deadline_ms)
        self._deadline_s(deadline_ms)  # refused here, not in the batch it would join
        raw = self.engine.preprocess.check_sample(raw)
        req = _Request(raw, input_ref, deadline_ms)
        if not self._batcher.offer(req):
            raise AgentBusy("the agent's batch queue is full; retry later")
        req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.answer is not None
        return req.answer

    def _batch_loop(self) -> None:
        assert self._batcher is not None
        while not self._stop.is_set():
            reqs = self._batcher.next_batch()
            if not reqs:
                continue
            # One deadline per batch: the tightest of its requests.
            deadlines = [r.deadline_ms for r in reqs if r.deadline_ms is not None]
            try:
                answers = self.infer_batch(np.stack([r.raw for r in reqs]),
                                           [r.input_ref for r in reqs],
                                           min(deadlines) if deadlines else None)
                for r, a in zip(reqs, answers, strict=True):
                    r.answer = a
            except Exception as exc:  # every waiter must hear of it
                log.exception("batch of %d failed", len(reqs))
                for r in reqs:
                    r.error = exc
            for r in reqs:
                r.done.set()

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    def _deadline_s(self, deadline_ms: float | None) -> float:
        """The deadline in seconds; a caller's must be finite, positive and at most the
        settings' `max_deadline_ms` (an infinite one would hold an offload slot for ever).
        Raises InputError."""
        if deadline_ms is None:
            return self.settings.offload.deadline_ms / 1000.0
        top = self.settings.offload.max_deadline_ms
        if not (isinstance(deadline_ms, int | float) and math.isfinite(deadline_ms)
                and 0 < deadline_ms <= top):
            self.counters.inc("input_errors")
            raise InputError(f"deadline_ms must be a number in (0, {top:g}], got {deadline_ms!r}")
        return deadline_ms / 1000.0

    def _offload_send(self, engine: Engine, rid: str, raw: np.ndarray, local: LocalResult,
                      deadline_s: float) -> int:
        """Publish an offload and register its waiter; returns the bytes sent, 0 if not sent."""
        if not self.transport.connected or not self.hub.may_offload():
            return 0  # answered from the edge at once (and, with late_answers, later by the hub)
        if not self.pending.open(rid):
            self.counters.inc("offload_busy")
            return 0
        payload = p.Offload(id=rid, model=engine.manifest.ref, input=np.asarray(raw),
                            deadline_ms=deadline_s * 1000.0, sent_at=time.time(),
                            edge_label=local.label, edge_score=local.score
                            ).encode(self.wire_version)
        self.counters.inc("offloaded")
        if not self.transport.publish(self._topics[p.Channel.OFFLOAD], payload,
                                      qos=p.QOS[p.Channel.OFFLOAD],
                                      expiry_s=deadline_s):
            self.pending.cancel(rid)
            return 0
        return len(payload)

    def _finish(self, engine: Engine, rid: str, raw: np.ndarray, local: LocalResult,
                answer: p.Answer | None, offload_bytes: int, t0: float,
                input_ref: str | None) -> InferenceAnswer:
        """Decide the final answer, store the result record (and a hard example still owed a
        cloud answer) in the outbox, and build the reply."""
        source: p.Source = "edge"
        final, conf = local.label, local.confidence
        cloud_label: int | None = None
        cloud_model: str | None = None
        if local.hard:
            if answer is not None and answer.error is None:
                source, final, conf = "cloud", answer.label, answer.confidence
                cloud_label, cloud_model = answer.label, answer.model
                self.counters.inc("cloud_answers")
            else:
                source = "edge_fallback"
                self.counters.inc("fallbacks")
                if answer is not None:
                    self.counters.inc("hub_errors")
                    log.warning("hub could not answer offload %s: %s", rid, answer.error)
        self._observe(engine, local, offload_bytes)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        degraded = source == "edge_fallback"
        now = time.time()
        record = p.encode_record(
            id=rid, device=self.device, seq=next(self._seq), ts=now, input_ref=input_ref,
            model=engine.manifest.ref, backend=engine.backend.name, policy=engine.policy.name,
            score=local.score, edge_label=local.label, edge_confidence=local.confidence,
            offloaded=local.hard, cloud_label=cloud_label, cloud_model=cloud_model,
            final_label=final, source=source, degraded=degraded, latency_ms=latency_ms,
            edge_ms=local.edge_ms, offload_bytes=offload_bytes)
        try:
            if degraded and self.settings.offload.late_answers:
                reason: p.HardReason = (
                    "hub_error" if answer is not None else "deadline" if offload_bytes
                    else "offline" if not self.transport.connected or self.hub.down
                    else "busy")
                self.outbox.add(EntryKind.HARD, rid, p.HardExample(
                    rid, engine.manifest.ref, np.asarray(raw), now, local.label, local.score,
                    reason).blob())
                self.counters.inc("late_queued")
            self.outbox.add(EntryKind.RESULT, rid, record)
        except OutboxFull as exc:
            # The application still gets its answer; the loss is counted and reported.
            self.counters.inc("outbox_full")
            log.warning("result %s not kept: %s", rid, exc)
        labels = engine.manifest.labels
        return InferenceAnswer(rid, final, labels[final] if final < len(labels) else str(final),
                               conf, source, degraded, local.hard, latency_ms,
                               engine.manifest.ref)

    # ------------------------------------------------------------------ messages in

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            _device, channel = p.parse_topic(topic)
            if channel is p.Channel.ANSWER:
                self.pending.deliver(p.Answer.decode(payload))
                if self.hub.down:
                    self.outbox.hub_heard()  # the hub is back: what waits is sent now
                self.hub.heard()
            elif channel is p.Channel.ACK:
                self.sender.queue_ack(p.Ack.decode(payload))
                self.hub.heard()
            elif channel is p.Channel.DESIRED and self.updater is not None:
                self.updater.offer(payload)  # checked and acted on by the updater's thread
        except ProtocolError as exc:
            self.counters.inc("bad_messages")
            log.warning("dropped a malformed message on %s: %s", topic, exc)

    def _on_connect(self) -> None:
        self.transport.publish(self._topics[p.Channel.STATUS],
                               p.status_payload("online", self.device, self.wire_version),
                               qos=p.QOS[p.Channel.STATUS], retain=True)
        if self.updater is not None:
            self.updater.publish_report()
        self.outbox.resend_all()  # also wakes the sender

    # ------------------------------------------------------------------ background loops

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.settings.telemetry_interval_s):
            self.publish_telemetry()

    def health(self) -> dict[str, Any]:
        """What /healthz says: "ok" only while the broker is connected and the hub answers
        ("degraded" otherwise: the agent still answers every input from the edge)."""
        connected = self.transport.connected
        hub = self.hub.state()
        return {"status": "ok" if connected and hub["reachable"] else "degraded",
                "model": self.model_ref, "backend": self.engine.backend.name,
                "connected": connected, "broker": {"connected": connected}, "hub": hub,
                "outbox": len(self.outbox)}

    def telemetry(self) -> dict[str, Any]:
        return {
            "device": self.device, "ts": time.time(), "uptime_s": time.time() - self.started_at,
            "model": self.model_ref, "backend": self.engine.backend.name,
            "policy": self.engine.policy.name, "threshold": self.engine.policy.threshold,
            "fidelity": self.engine.fidelity_summary(), "offload": self.offload_state(),
            "labels": self.settings.labels,
            "queues": {"offloads_pending": len(self.pending), "outbox": len(self.outbox)},
            "hub": self.hub.state(),
            "outbox": self.outbox.stats().to_dict(),
            "counters": {**self.counters.snapshot(), "late_answers": self.pending.late_answers},
            "update": (None if self.updater is None else
                       {"state": self.updater.record.state, "target": self.updater.record.target,
                        "code": self.updater.record.code}),
            "system": self._telemetry.sample(),
            "mqtt_bytes": self.mqtt_bytes(),
        }

    def mqtt_bytes(self) -> dict[str, int] | None:
        """Bytes to and from the broker since start, as the kernel counted them (None where
        it does not): what this device's link carried for the fleet."""
        counter = getattr(self.transport, "wire_bytes", None)
        counted = counter() if counter is not None else None
        return None if counted is None else {"sent": counted[0], "received": counted[1]}

    def publish_telemetry(self) -> None:
        self.transport.publish(self._topics[p.Channel.TELEMETRY],
                               p.encode_json(p.Kind.TELEMETRY, self.telemetry(),
                                             self.wire_version),
                               qos=p.QOS[p.Channel.TELEMETRY])
