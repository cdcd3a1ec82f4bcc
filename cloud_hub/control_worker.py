"""The control worker: stores the devices' state (status, update reports, telemetry), apart
from the bulk of results so that state never waits behind a backlog (a rollout waits on
install reports).

Status and reports are stored as they come, each in its own transaction; every
TELEMETRY_FLUSH_S the newest telemetry of each device that sent some is stored in one
transaction (a fleet's heartbeats are many small messages; one transaction each cost the hub
more than its results). A message that does not decode is refused; a transaction the database
refuses is split until only the devices whose data it refuses alone are left
(cloud_hub/isolation.py): one device's telemetry or report never shares another's fate, and
nothing waits on one device's bad data. Only a database that does not answer makes the worker
back off.

State over a device's quota is not dropped: the newest per device and channel is held
(`defer`) and stored at the next tick (it is not sent again, and rollouts wait on it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from sqlalchemy.orm import sessionmaker

from cloud_hub.assignments import record_reported
from cloud_hub.ingest import record_status, record_telemetry_many
from cloud_hub.ingest_worker import Incoming, decode_refusing
from cloud_hub.isolation import OutageBackoff, database_answers, store_apart
from cloud_hub.metrics import HubMetrics
from cloud_hub.refusals import Refusals
from fleet.contract import protocol as p
from fleet.contract.assignment import Reported
from fleet.inference.batcher import DynamicBatcher

log = logging.getLogger(__name__)

TELEMETRY_FLUSH_S = 0.5
# Held state over quota is queued for storing this often.
DEFERRED_FLUSH_S = 1.0
# Gauges take a device's figure only inside this range (a gauge holds a float; a figure
# beyond it is a device's error, not a value worth a time series).
GAUGE_LIMIT = 1e15


class ControlWorker:
    def __init__(self, sessions: sessionmaker, metrics: HubMetrics, refusals: Refusals,
                 queue_size: int) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.refusals = refusals
        self.queue: DynamicBatcher[Incoming] = DynamicBatcher(1, 0.0, queue_size)
        self._lock = threading.Lock()
        self._telemetry: dict[str, bytes] = {}
        self._deferred: dict[tuple[str, p.Channel], bytes] = {}
        self._next_flush = time.monotonic() + TELEMETRY_FLUSH_S
        self._next_deferred = time.monotonic() + DEFERRED_FLUSH_S
        self.outage = OutageBackoff(metrics)

    # ------------------------------------------------------------------ from the MQTT thread

    def hold_telemetry(self, device: str, payload: bytes) -> None:
        with self._lock:
            self._telemetry[device] = payload

    def defer(self, device: str, channel: p.Channel, payload: bytes) -> None:
        with self._lock:
            self._deferred[(device, channel)] = payload

    def held(self) -> int:
        """Messages waiting to be stored: queued, telemetry held, state deferred."""
        return len(self.queue) + len(self._telemetry) + len(self._deferred)

    # ------------------------------------------------------------------ the worker

    def step(self) -> float | None:
        now = time.monotonic()
        ok = True
        if now >= self._next_deferred:
            self._next_deferred = now + DEFERRED_FLUSH_S
            self._flush_deferred()
        if now >= self._next_flush:
            self._next_flush = now + TELEMETRY_FLUSH_S
            ok = self.flush_telemetry()
        for item in self.queue.next_batch(TELEMETRY_FLUSH_S / 2):
            ok = self.store_state(item) and ok
        self.metrics.queue_depth.labels("control").set(len(self.queue))
        self.outage.settle(ok)
        return None

    def _flush_deferred(self) -> None:
        with self._lock:
            items, self._deferred = self._deferred, {}
        for (device, channel), payload in items.items():
            if not self.queue.offer(Incoming(device, channel, payload)):
                with self._lock:  # try again at the next tick
                    self._deferred.setdefault((device, channel), payload)

    def answers(self) -> bool:
        return database_answers(self.sessions)

    def store_state(self, item: Incoming) -> bool:
        """Store one status or report message; False while the database is down (the message
        is then held back for the next try)."""
        if item.channel is p.Channel.STATUS:
            st = decode_refusing(item, p.Status.decode, self.refusals)
            if not isinstance(st, p.Status):
                return True
            online = st.online

            def store(_: Sequence[Incoming]) -> None:
                record_status(self.sessions, item.device, online)
        elif item.channel is p.Channel.REPORTED:
            r = decode_refusing(item, Reported.decode, self.refusals)
            if not isinstance(r, Reported):
                return True
            if r.device != item.device:
                self.refusals.refuse(item.device, item.channel.value, "field",
                                     f"report names device {r.device!r}", item.payload)
                return True
            report = r

            def store(_: Sequence[Incoming]) -> None:
                record_reported(self.sessions, item.device, report)
                self.metrics.update_reports.labels(report.state.value).inc()
        else:
            return True
        if store_apart([item], store, self._refuse, self.answers):
            return True
        self.defer(item.device, item.channel, item.payload)  # stored when the database is back
        return False

    def _refuse(self, item: Incoming, exc: Exception) -> None:
        self.refusals.refuse(item.device, item.channel.value, "store", exc, item.payload)

    def flush_telemetry(self) -> bool:
        """Store the newest telemetry of each device heard since the last flush, at once;
        False while the database is down (the telemetry is then dropped: newer comes)."""
        with self._lock:
            held, self._telemetry = self._telemetry, {}
        items: list[tuple[str, p.Telemetry]] = []
        for device, payload in held.items():
            t = decode_refusing(Incoming(device, p.Channel.TELEMETRY, payload),
                                p.Telemetry.decode, self.refusals)
            if isinstance(t, p.Telemetry):
                self._device_gauges(device, t)
                items.append((device, t))

        def store(chunk: Sequence[tuple[str, p.Telemetry]]) -> None:
            bad = record_telemetry_many(self.sessions, list(chunk))
            self.metrics.bad_messages.labels("labels").inc(sum(1 for v in bad.values() if v))

        def refuse(one: tuple[str, p.Telemetry], exc: Exception) -> None:
            self.refusals.refuse(one[0], p.Channel.TELEMETRY.value, "store", exc,
                                 held.get(one[0], b""))

        return store_apart(items, store, refuse, self.answers)

    def _device_gauges(self, device: str, t: p.Telemetry) -> None:
        """The device's outbox, offload controller and fidelity, from its telemetry."""
        m = self.metrics
        ob = t.header.get("outbox")
        if isinstance(ob, dict):
            for key in ("entries", "dropped_full", "dropped_expired"):
                v = p.figure(ob, key, GAUGE_LIMIT)
                if v is not None:
                    m.device_outbox.labels(device, key).set(v)
        if t.offload is not None:
            for key in ("target", "recent_rate", "threshold", "drift"):
                v = p.figure(t.offload, key, GAUGE_LIMIT)
                if v is not None:
                    m.device_offload.labels(device, key).set(v)
            m.device_drifting.labels(device).set(1 if t.offload.get("drifting") is True else 0)
        if t.fidelity is not None:
            v = p.figure(t.fidelity, "agreement", GAUGE_LIMIT)
            if v is not None:
                m.device_fidelity.labels(device, p.short_text(t.fidelity.get("backend"),
                                                              32)).set(v)
