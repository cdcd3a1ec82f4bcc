"""Result records waiting for the hub's acknowledgement.

The outbox keeps every record until the hub acknowledges it at the application level (after its
database commit): a broker PUBACK is no proof of storage. Unacknowledged records are sent again
after `resend_after_s` and after every reconnect; the hub ingests idempotently on the record id.

This outbox lives in memory: it survives broker and hub outages, not an agent crash or reboot.
A durable SQLite outbox is planned (see the README's "Not yet" list).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from fleet.protocol import ResultRecord

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    record: ResultRecord
    sent_at: float = 0.0  # 0: never sent, or to be sent again


class MemoryOutbox:
    def __init__(self, max_pending: int, resend_after_s: float) -> None:
        self._max = max_pending
        self._resend_after = resend_after_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self.produced = 0
        self.acked = 0
        self.rejected = 0
        self.dropped = 0

    def add(self, record: ResultRecord) -> None:
        with self._lock:
            if len(self._entries) >= self._max:
                old_id, _ = self._entries.popitem(last=False)
                self.dropped += 1
                log.warning("outbox full (%d records): dropped the oldest, %s", self._max, old_id)
            self._entries[record.id] = _Entry(record)
            self.produced += 1
            self._ready.notify()

    def due(self, max_records: int, now: float | None = None) -> list[ResultRecord]:
        """Records never sent, or sent longer ago than the resend interval, oldest first."""
        now = time.monotonic() if now is None else now
        out: list[ResultRecord] = []
        with self._lock:
            for e in self._entries.values():
                if e.sent_at == 0.0 or now - e.sent_at >= self._resend_after:
                    out.append(e.record)
                    if len(out) >= max_records:
                        break
        return out

    def mark_sent(self, ids: list[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for i in ids:
                e = self._entries.get(i)
                if e is not None:
                    e.sent_at = now

    def ack(self, ids: list[str], rejected: dict[str, str] | None = None) -> int:
        """Forget acknowledged and refused records; returns how many were still here."""
        n = 0
        with self._lock:
            for i in ids:
                if self._entries.pop(i, None) is not None:
                    self.acked += 1
                    n += 1
            for i, why in (rejected or {}).items():
                if self._entries.pop(i, None) is not None:
                    self.rejected += 1
                    n += 1
                    log.error("hub refused result %s for good: %s", i, why)
            if not self._entries:
                self._ready.notify_all()
        return n

    def resend_all(self) -> None:
        """After a reconnect: whatever was in flight may be lost, send it again."""
        with self._lock:
            for e in self._entries.values():
                e.sent_at = 0.0

    def wait_for_work(self, timeout: float) -> None:
        with self._lock:
            if not self._entries:
                self._ready.wait(timeout)

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._entries:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ready.wait(min(left, 0.1))
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
