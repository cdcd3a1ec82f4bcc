"""Offloads waiting for their cloud answer, each with its own deadline."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from fleet.contract.protocol import Answer


@dataclass(slots=True)
class _Slot:
    event: threading.Event = field(default_factory=threading.Event)
    answer: Answer | None = None


class PendingOffloads:
    """Maps offload ids to waiters; the MQTT thread delivers, the requesting thread waits."""

    def __init__(self, max_pending: int) -> None:
        self._max = max_pending
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self.late_answers = 0

    def open(self, offload_id: str) -> bool:
        """Register a waiter; False when too many offloads are already waiting."""
        with self._lock:
            if len(self._slots) >= self._max:
                return False
            self._slots[offload_id] = _Slot()
            return True

    def deliver(self, answer: Answer) -> bool:
        """Hand an answer to its waiter; False for an answer nobody waits for (late or unknown)."""
        with self._lock:
            slot = self._slots.get(answer.id)
            if slot is None:
                self.late_answers += 1
                return False
            slot.answer = answer
        slot.event.set()
        return True

    def wait(self, offload_id: str, timeout_s: float) -> Answer | None:
        """Wait for the answer until the deadline; the waiter is removed either way."""
        with self._lock:
            slot = self._slots.get(offload_id)
        if slot is None:
            return None
        slot.event.wait(timeout_s)
        with self._lock:
            self._slots.pop(offload_id, None)
            return slot.answer

    def cancel(self, offload_id: str) -> None:
        with self._lock:
            self._slots.pop(offload_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)
