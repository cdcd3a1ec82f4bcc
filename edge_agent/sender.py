"""The results sender: moves the outbox's result records and hard examples to the hub, in
batches, within a drain rate and an in-flight window, and forgets them on the hub's acks.

One thread runs `loop`; paho's network thread only queues acks (`queue_ack`): deleting from
SQLite there would hold up the cloud answers that arrive on the same thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from edge_agent.config import ResultsSettings
from edge_agent.outbox import Outbox
from edge_agent.outbox_store import EntryKind
from fleet.contract import protocol as p
from fleet.transport.mqtt import Transport

log = logging.getLogger(__name__)

# An idle sender (nothing in flight) still wakes this often, to notice a reconnect it missed.
SENDER_IDLE_WAKE_S = 5.0
# Bounds and expiry are enforced after every change, and at least this often.
MAINTAIN_EVERY_S = 60.0


class TokenBucket:
    """At most `rate` entries per second on average, in bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.at = time.monotonic()

    def available(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens

    def take(self, n: int) -> None:
        self.tokens -= n


class ResultSender:
    """Sends what the outbox holds for the hub and applies the hub's acknowledgements."""

    def __init__(self, settings: ResultsSettings, outbox: Outbox, transport: Transport,
                 topic: Callable[[p.Channel], str], wire_version: int = p.PROTOCOL_VERSION
                 ) -> None:
        self.settings = settings
        self.wire_version = wire_version
        self.outbox = outbox
        self.transport = transport
        self._topic = topic
        self._acks: queue.SimpleQueue[p.Ack] = queue.SimpleQueue()
        self._drain = TokenBucket(settings.drain_rate,
                                  max(settings.batch_max, settings.drain_rate * 0.5))

    def queue_ack(self, ack: p.Ack) -> None:
        """An ack from the network thread: applied by the sender thread."""
        self._acks.put(ack)
        self.outbox.poke()

    def loop(self, stop: threading.Event) -> None:
        rs = self.settings
        seen = -1
        maintained_at, maintained_gen = 0.0, -1
        while not stop.is_set():
            connected = self.transport.connected
            # With entries in flight, look every flush interval (acks, resend timers); else
            # sleep until an entry arrives or the broker comes back (both wake this thread).
            busy = connected and len(self.outbox) > 0
            seen = self.outbox.wait_for_change(seen, rs.flush_interval_s if busy
                                               else SENDER_IDLE_WAKE_S)
            if stop.is_set():
                return
            # Let a batch fill up for a moment: fewer, larger messages (and while offline, one
            # move of the journal into SQLite per interval, not one per answer).
            if not connected or self.outbox.pending(EntryKind.RESULT) < rs.batch_max:
                stop.wait(rs.flush_interval_s)
            try:
                self.apply_acks()
                now = time.monotonic()
                if seen != maintained_gen or now - maintained_at >= MAINTAIN_EVERY_S:
                    self.outbox.maintain()
                    maintained_at, maintained_gen = now, seen
                self.flush()
            except Exception:  # a disk error must not end the sender; it is retried
                log.exception("outbox: sending failed; retrying")
                stop.wait(rs.flush_interval_s)

    def apply_acks(self) -> int:
        """Forget what the hub acknowledged (the acks queued by the network thread)."""
        n = 0
        while True:
            try:
                ack = self._acks.get_nowait()
            except queue.Empty:
                return n
            kind = EntryKind.RESULT if ack.of == "results" else EntryKind.HARD
            n += self.outbox.ack(kind, ack.ids, ack.rejected)

    def flush(self) -> int:
        """Send due result records and hard examples in batches, within the drain rate and the
        in-flight window; returns how many entries were sent."""
        if not self.transport.connected:
            return 0
        rs = self.settings
        sent = 0
        for kind, channel in ((EntryKind.RESULT, p.Channel.RESULTS),
                              (EntryKind.HARD, p.Channel.HARD)):
            while self._drain.available() >= 1:
                batch = self.outbox.due(kind, min(rs.batch_max, int(self._drain.tokens)),
                                        rs.batch_max_bytes, rs.max_inflight)
                if not batch.entries:
                    break
                blobs = [e.body for e in batch.entries]
                payload = (p.ResultBatch(batch.ids, blobs).encode(self.wire_version)
                           if kind is EntryKind.RESULT
                           else p.encode_hard_batch(batch.ids, blobs, self.wire_version))
                if not self.transport.publish(self._topic(channel), payload,
                                              qos=p.QOS[channel]):
                    return sent
                self.outbox.mark_sent(batch)
                self._drain.take(len(batch))
                sent += len(batch)
        return sent
