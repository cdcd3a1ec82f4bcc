"""The hub's heartbeat through the broker: a replica publishes to its own topic every
HEARTBEAT_S; hearing nothing at all (no device, not its own heartbeat) for DEAF_AFTER_HEARTBEATS
of them while connected, it is deaf: it says so in /readyz and reconnects."""

from __future__ import annotations

import logging
import time

from cloud_hub.metrics import HubMetrics
from fleet.transport.mqtt import Transport

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
DEAF_AFTER_HEARTBEATS = 3
# How often the worker looks at the clock (a step).
TICK_S = 1.0


class BrokerHeartbeat:
    def __init__(self, transport: Transport, topic: str, metrics: HubMetrics,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        self.transport = transport
        self.topic = topic
        self.metrics = metrics
        self.heartbeat_s = heartbeat_s
        self._heard = self._connected_at = time.monotonic()
        self._next_beat = time.monotonic() + heartbeat_s
        self.deaf = False

    @property
    def silence_s(self) -> float:
        """Seconds since the last message from the broker."""
        return time.monotonic() - self._heard

    def heard(self) -> None:
        """A message arrived (any topic)."""
        self._heard = time.monotonic()
        if self.deaf:
            self.deaf = False
            log.info("hearing the broker again")

    def connected(self) -> None:
        self._connected_at = time.monotonic()

    def step(self) -> float | None:
        """Beat when due, and reconnect when deaf; returns the pause to the next look."""
        pause = min(TICK_S, self.heartbeat_s)
        if not self.transport.connected or time.monotonic() < self._next_beat:
            return pause
        self._next_beat = time.monotonic() + self.heartbeat_s
        self.transport.publish(self.topic, b"", qos=0)
        silence = self.silence_s
        self.metrics.broker_silence.set(round(silence, 1))
        limit = DEAF_AFTER_HEARTBEATS * self.heartbeat_s
        if silence > limit and time.monotonic() - self._connected_at > limit:
            self.deaf = True
            self.metrics.broker_deaf.inc()
            log.error("heard nothing from the broker for %.0f s, not even this hub's own "
                      "heartbeat: reconnecting", silence)
            self._connected_at = time.monotonic()
            reconnect = getattr(self.transport, "reconnect", None)
            if reconnect is not None:
                reconnect()
        return pause
