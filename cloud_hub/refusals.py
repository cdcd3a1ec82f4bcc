"""Refused messages: every one counted by channel and reason, logged with the start of its
payload, at most once per device, channel and reason every LOG_EVERY_S (a device sending garbage
in a loop must not fill the hub's log)."""

from __future__ import annotations

import logging
import threading
import time

from cloud_hub.metrics import HubMetrics

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0
LOG_PAYLOAD_BYTES = 48
LOG_DETAIL_CHARS = 300
# Distinct (device, channel, reason) keys remembered for the log's rate limit; beyond, the
# memory is cleared (a flood of invented ids costs a few log lines, not memory).
MAX_KEYS = 10_000


class Refusals:
    def __init__(self, metrics: HubMetrics) -> None:
        self.metrics = metrics
        self._logged: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def refuse(self, device: str, channel: str, reason: str, detail: object,
               payload: bytes = b"") -> None:
        self.metrics.refused.labels(channel, reason).inc()
        self.metrics.bad_messages.labels(reason).inc()
        if not self.may_log(device, channel, reason):
            return
        log.warning("refused a %s message of %s (%s): %s; payload starts %r", channel, device,
                    reason, str(detail)[:LOG_DETAIL_CHARS], bytes(payload[:LOG_PAYLOAD_BYTES]))

    def may_log(self, device: str, channel: str, reason: str) -> bool:
        """True at most once per LOG_EVERY_S for this device, channel and reason."""
        key = (device, channel, reason)
        now = time.monotonic()
        with self._lock:
            if now - self._logged.get(key, -LOG_EVERY_S) < LOG_EVERY_S:
                return False
            if len(self._logged) >= MAX_KEYS:
                self._logged.clear()
            self._logged[key] = now
        return True
