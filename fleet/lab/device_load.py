"""Load from many devices on one hub: the inputs, offloads, result batches, telemetry and status
of `n` devices, written with the protocol's own encoders, over a few shared MQTT connections.

What each device does is what an agent does, scaled down to what a load generator can afford:
inputs arrive at `rate_hz` (Poisson); a share `offload` of them is offloaded (a real `Offload`
of a real input; the hub's cloud model answers it) and waits for its answer up to the deadline;
every input becomes a result record (source cloud, or edge_fallback past the deadline),
batched every `flush_s` and sent again after `resend_s` until the hub acknowledges it;
telemetry every `telemetry_s`. The devices share `connections` MQTT sessions (a device's topics
are a naming convention on an open broker; the hub sees each device on its own topics).

Counted: offload round trips (publish to answer, measured in this process), records produced,
acknowledged and still pending, answers missing. `lost` = records produced and never
acknowledged after the settle time.
"""

from __future__ import annotations

import heapq
import queue
import random
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from fleet.contract import protocol as p
from fleet.transport.mqtt import MqttConfig, MqttSession

TICK_S = 0.05
HOUSEKEEPING_S = 0.5


@dataclass
class _Device:
    id: str
    seq: int = 0
    batch: list[tuple[str, bytes]] = field(default_factory=list)
    unacked: dict[str, tuple[float, bytes]] = field(default_factory=dict)  # id -> (sent, blob)
    next_flush: float = 0.0
    next_telemetry: float = 0.0


@dataclass
class _Pending:
    device: _Device
    sent: float
    index: int
    edge_label: int


class DeviceLoad:
    def __init__(self, *, broker_port: int, x: np.ndarray, edge_labels: np.ndarray,
                 prefix: str = "load", rate_hz: float = 1.0, offload: float = 0.2,
                 deadline_ms: float = 250.0, flush_s: float = 0.2, resend_s: float = 5.0,
                 telemetry_s: float = 10.0, connections: int = 2, seed: int = 0,
                 wire_version: int = p.PROTOCOL_VERSION) -> None:
        self.x = x
        self.edge_labels = edge_labels
        self.prefix = prefix
        self.rate_hz = rate_hz
        self.offload = offload
        self.deadline_s = deadline_ms / 1000.0
        self.flush_s = flush_s
        self.resend_s = resend_s
        self.telemetry_s = telemetry_s
        self.version = wire_version
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._devices: dict[str, _Device] = {}
        self._active: list[_Device] = []
        self._pending: dict[str, _Pending] = {}
        self._expiry: deque[tuple[float, str]] = deque()
        # Devices whose batch an answer started (on the network thread): the loop schedules
        # their flush.
        self._answered_first: list[_Device] = []
        self._inbox: queue.SimpleQueue[tuple[float, str, bytes]] = queue.SimpleQueue()
        self._id_prefix = secrets.token_hex(8)
        self._ids = 0
        self.rtt_ms: list[float] = []
        self.hub_ms: list[float] = []  # each answer's time inside the hub, as it says
        self.produced = 0
        self.acked = 0
        self.rejected = 0
        self.answered = 0
        self.missed = 0
        self.offloads = 0
        self.inputs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        subs = [(f"{p.TOPIC_ROOT}/+/{p.Channel.ANSWER.value}", 1),
                (f"{p.TOPIC_ROOT}/+/{p.Channel.ACK.value}", 1)]
        run = secrets.token_hex(3)
        self._sessions = [MqttSession(MqttConfig(port=broker_port, protocol="5",
                                                 client_id=f"{prefix}-{run}-{i}"),
                                      self._on_message, subs) for i in range(connections)]
        self._pick = random.Random(seed)

    # ------------------------------------------------------------------ control

    def start(self, timeout_s: float = 10.0) -> None:
        for s in self._sessions:
            s.start()
        for s in self._sessions:
            if not s.wait_connected(timeout_s):
                raise RuntimeError("the load generator could not reach the broker")
        self._thread = threading.Thread(target=self._loop, name="device-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for s in self._sessions:
            s.stop()

    def scale_to(self, n: int) -> None:
        """Run `n` devices (more are added, each announcing itself; none are removed)."""
        with self._lock:
            while len(self._active) < n:
                d = _Device(f"{self.prefix}-{len(self._active):05d}")
                now = time.monotonic()
                d.next_telemetry = now + self._pick.uniform(0, self.telemetry_s)
                self._devices[d.id] = d
                self._active.append(d)
                self._publish(d, p.Channel.STATUS, p.status_payload("online", d.id, self.version),
                              retain=True)

    @property
    def devices(self) -> int:
        return len(self._active)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {"inputs": self.inputs, "offloads": self.offloads, "answered": self.answered,
                    "missed": self.missed, "produced": self.produced, "acked": self.acked,
                    "rejected": self.rejected,
                    "unacked": sum(len(d.unacked) + len(d.batch) for d in self._active)}

    def take_rtts(self) -> tuple[list[float], list[float]]:
        """(round trips, time inside the hub) of the offloads answered since the last call."""
        with self._lock:
            out, self.rtt_ms = self.rtt_ms, []
            hub, self.hub_ms = self.hub_ms, []
        return out, hub

    def oldest_unacked_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            ages = [now - t for d in self._active for t, _ in d.unacked.values()]
        return max(ages, default=0.0)

    # ------------------------------------------------------------------ traffic

    def _session(self, d: _Device) -> MqttSession:
        return self._sessions[hash(d.id) % len(self._sessions)]

    def _publish(self, d: _Device, channel: p.Channel, payload: bytes,
                 retain: bool = False) -> None:
        self._session(d).publish(p.topic(d.id, channel), payload, qos=p.QOS[channel],
                                 retain=retain)

    def _new_id(self) -> str:
        self._ids += 1
        return f"{self._id_prefix}{self._ids:x}"

    def _record(self, d: _Device, rid: str, i: int, edge: int, cloud: int | None, hard: bool,
                latency_ms: float, now: float) -> None:
        d.seq += 1
        source: p.Source = "edge" if not hard else "cloud" if cloud is not None \
            else "edge_fallback"
        blob = p.encode_record(
            id=rid, device=d.id, seq=d.seq, ts=time.time(), input_ref=None,
            model="digits-edge@1", backend="onnxruntime", policy="max_prob", score=0.5,
            edge_label=edge, edge_confidence=0.9, offloaded=hard, cloud_label=cloud,
            cloud_model="digits-cloud@1" if cloud is not None else None,
            final_label=cloud if cloud is not None else edge, source=source,
            degraded=source == "edge_fallback", latency_ms=latency_ms, edge_ms=0.05,
            offload_bytes=300 if hard else 0)
        if not d.batch:
            d.next_flush = now + self.flush_s
        d.batch.append((rid, blob))
        self.produced += 1

    def _loop(self) -> None:
        """Inputs arrive as one Poisson process over all devices (each input to a device drawn
        at random), at their own times rather than in ticks: a tick would send a burst of
        offloads at once and measure the burst, not the hub. Batches are flushed when due;
        resends and telemetry are looked at every HOUSEKEEPING_S."""
        next_input = time.monotonic()
        next_house = time.monotonic()
        flushes: list[tuple[float, str]] = []
        while not self._stop.is_set():
            now = time.monotonic()
            sends: list[tuple[_Device, list[tuple[str, bytes]] | None]] = []
            with self._lock:
                self._drain_inbox()
                rate = self.rate_hz * len(self._active)
                if rate <= 0:
                    next_input = now + TICK_S
                while next_input <= now and rate > 0:
                    d = self._active[int(self._rng.integers(len(self._active)))]
                    had = bool(d.batch)
                    self._input(d, now)
                    if not had and d.batch:
                        heapq.heappush(flushes, (d.next_flush, d.id))
                    next_input += float(self._rng.exponential(1.0 / rate))
                while self._expiry and self._expiry[0][0] <= now:
                    _, rid = self._expiry.popleft()
                    pend = self._pending.pop(rid, None)
                    if pend is not None:  # no answer by the deadline: the edge answer stands
                        self.missed += 1
                        had = bool(pend.device.batch)
                        self._record(pend.device, rid, pend.index, pend.edge_label, None, True,
                                     self.deadline_s * 1000.0, now)
                        if not had:
                            heapq.heappush(flushes, (pend.device.next_flush, pend.device.id))
                for d in self._answered_first:
                    heapq.heappush(flushes, (d.next_flush, d.id))
                self._answered_first.clear()
                while flushes and flushes[0][0] <= now:
                    _, dev = heapq.heappop(flushes)
                    d = self._devices[dev]
                    if d.batch:
                        sends.append((d, d.batch))
                        for rid, blob in d.batch:
                            d.unacked[rid] = (now, blob)
                        d.batch = []
                if now >= next_house:
                    next_house = now + HOUSEKEEPING_S
                    for d in self._active:
                        if d.unacked:
                            due = [(rid, blob) for rid, (t, blob) in d.unacked.items()
                                   if now - t >= self.resend_s]
                            if due:
                                for rid, blob in due:
                                    d.unacked[rid] = (now, blob)
                                sends.append((d, due))
                        if now >= d.next_telemetry:
                            d.next_telemetry = now + self.telemetry_s
                            sends.append((d, None))
                wake = min(next_input, next_house,
                           flushes[0][0] if flushes else next_house,
                           self._expiry[0][0] if self._expiry else next_house)
            for d, items in sends:
                if items is None:
                    self._publish(d, p.Channel.TELEMETRY, p.encode_json(p.Kind.TELEMETRY, {
                        "device": d.id, "ts": time.time(), "model": "digits-edge@1",
                        "backend": "onnxruntime", "simulated": True}, self.version))
                else:
                    ids = [rid for rid, _ in items]
                    blobs = [blob for _, blob in items]
                    self._publish(d, p.Channel.RESULTS,
                                  p.ResultBatch(ids, blobs).encode(self.version))
            delay = wake - time.monotonic()
            if delay > 0:
                self._stop.wait(min(delay, TICK_S))

    def _input(self, d: _Device, now: float) -> None:
        self.inputs += 1
        i = int(self._rng.integers(len(self.x)))
        edge = int(self.edge_labels[i])
        rid = self._new_id()
        if self._rng.random() >= self.offload:
            self._record(d, rid, i, edge, None, False, 0.3, now)
            return
        self.offloads += 1
        self._pending[rid] = _Pending(d, time.perf_counter(), i, edge)
        self._expiry.append((now + self.deadline_s, rid))
        payload = p.Offload(id=rid, model="digits-edge@1", input=self.x[i],
                            deadline_ms=self.deadline_s * 1000.0, sent_at=time.time(),
                            edge_label=edge, edge_score=0.5).encode(self.version)
        self._session(d).publish(p.topic(d.id, p.Channel.OFFLOAD), payload, qos=1,
                                 expiry_s=self.deadline_s)

    def _on_message(self, topic: str, payload: bytes) -> None:
        """On a network thread: only the arrival time is taken here; the loop does the rest
        (a lock shared with the loop made answers wait behind it)."""
        self._inbox.put((time.perf_counter(), topic, payload))

    def _drain_inbox(self) -> None:
        """Apply the answers and acks that arrived (the loop holds the lock)."""
        while True:
            try:
                t, topic, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                device, channel = p.parse_topic(topic)
                if channel is p.Channel.ANSWER:
                    a = p.Answer.decode(payload)
                    pend = self._pending.pop(a.id, None)
                    if pend is None:
                        continue  # past its deadline: counted as missed
                    ms = (t - pend.sent) * 1000.0
                    self.rtt_ms.append(ms)
                    self.hub_ms.append(a.hub_ms)
                    self.answered += 1
                    cloud = a.label if a.error is None else None
                    had = bool(pend.device.batch)
                    self._record(pend.device, a.id, pend.index, pend.edge_label, cloud, True,
                                 ms, time.monotonic())
                    if not had:
                        self._answered_first.append(pend.device)
                elif channel is p.Channel.ACK:
                    ack = p.Ack.decode(payload)
                    d = self._devices.get(device)
                    if d is None:
                        continue
                    for rid in ack.ids:
                        if d.unacked.pop(rid, None) is not None:
                            self.acked += 1
                    for rid in ack.rejected:
                        if d.unacked.pop(rid, None) is not None:
                            self.rejected += 1
            except Exception:  # a load generator keeps going; the figures show what was lost
                continue
