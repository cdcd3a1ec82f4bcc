"""A well-behaved device beside an attacker: it sends valid results (resent until acknowledged,
as an agent does), update reports and telemetry through its own identity, and measures how long
the hub takes to acknowledge its results and to store its reports. For `bench/security.py`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fleet.contract import protocol as p
from fleet.contract.assignment import Reported, UpdateState
from fleet.lab.mqtt_probe import Probe
from fleet.lab.percentiles import percentile

# Results not acknowledged after this long are sent again (an agent's resend_after_s).
RESEND_S = 5.0


class VictimDevice:
    def __init__(self, probe: Probe, device: str) -> None:
        self.probe = probe
        self.device = device
        self._lock = threading.Lock()
        self._sent_at: dict[str, float] = {}         # batch key -> first send
        self._batches: dict[str, tuple[list[str], bytes, float]] = {}  # key -> ids, payload, last
        self._owner: dict[str, str] = {}             # record id -> batch key
        self._left: dict[str, set[str]] = {}         # batch key -> ids not acknowledged
        self.ack_ms: list[tuple[float, float]] = []  # (when acknowledged, ms) per batch
        self.sent_ids: set[str] = set()
        self.acked_ids: set[str] = set()
        self._n = 0
        probe.client.message_callback_add(p.topic(device, p.Channel.ACK), self._on_ack)
        probe.subscribe(p.topic(device, p.Channel.ACK))

    def _on_ack(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.monotonic()
        a = p.Ack.decode(bytes(msg.payload))
        with self._lock:
            for i in a.ids:
                key = self._owner.get(i)
                if key is None or i in self.acked_ids:
                    continue
                self.acked_ids.add(i)
                left = self._left[key]
                left.discard(i)
                if not left:
                    self.ack_ms.append((now, (now - self._sent_at[key]) * 1000.0))
                    del self._batches[key]

    def send_results(self, n: int = 8) -> None:
        recs = []
        for _ in range(n):
            self._n += 1
            off = self._n % 5 == 0
            recs.append(p.ResultRecord(
                id=f"{self.device}-{self._n}", device=self.device, seq=self._n,
                ts=time.time(), input_ref=f"victim:{self._n}", model="digits-edge@1",
                backend="onnxruntime", policy="max_prob", score=0.2, edge_label=self._n % 10,
                edge_confidence=0.8, offloaded=off, cloud_label=self._n % 10 if off else None,
                cloud_model="digits-cloud@1" if off else None, final_label=self._n % 10,
                source="cloud" if off else "edge", latency_ms=0.5, edge_ms=0.1,
                offload_bytes=120 if off else 0))
        payload = p.ResultBatch.of(recs).encode()
        ids = [r.id for r in recs]
        key = ids[0]
        now = time.monotonic()
        with self._lock:
            self._sent_at[key] = now
            self._batches[key] = (ids, payload, now)
            self._left[key] = set(ids)
            for i in ids:
                self._owner[i] = key
            self.sent_ids.update(ids)
        self.probe.client.publish(p.topic(self.device, p.Channel.RESULTS), payload, qos=1)

    def resend_due(self) -> int:
        """Send again what waited longer than RESEND_S; how many batches."""
        now = time.monotonic()
        with self._lock:
            due = [(k, v) for k, v in self._batches.items() if now - v[2] > RESEND_S]
            for k, (ids, payload, _) in due:
                self._batches[k] = (ids, payload, now)
        for _k, (_ids, payload, _) in due:
            self.probe.client.publish(p.topic(self.device, p.Channel.RESULTS), payload, qos=1)
        return len(due)

    def send_telemetry(self) -> None:
        self.probe.client.publish(p.topic(self.device, p.Channel.TELEMETRY), p.encode_json(
            p.Kind.TELEMETRY, {"device": self.device, "ts": time.time(),
                               "model": "digits-edge@1", "backend": "onnxruntime"}, 2), qos=0)

    def report_delay_s(self, k: int, stored_target: Callable[[], str | None],
                       timeout_s: float = 30.0) -> float | None:
        """Publish a report naming target `k`; seconds until the hub has stored it (None:
        not within `timeout_s`)."""
        target = f"digits-edge@{k}"
        r = Reported(self.device, "digits-edge@1", UpdateState.DOWNLOADING, target=target,
                     ts=time.time())
        t0 = time.monotonic()
        self.probe.client.publish(p.topic(self.device, p.Channel.REPORTED), r.encode(), qos=1,
                                  retain=True)
        while time.monotonic() - t0 < timeout_s:
            if stored_target() == target:
                return time.monotonic() - t0
            time.sleep(0.02)
        return None

    def wait_acked(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._lock:
                if self.acked_ids >= self.sent_ids:
                    return True
            self.resend_due()
            time.sleep(0.1)
        return False

    def ack_ms_at(self, q: float, since: float = 0.0,
                  until: float = float("inf")) -> float | None:
        """The `q`th percentile of the acknowledgement times of batches acknowledged in
        [since, until)."""
        with self._lock:
            xs = [ms for at, ms in self.ack_ms if since <= at < until]
        return percentile(xs, q)
