"""What the agent owes the hub: result records and hard examples, kept until the hub commits them.

An entry is stored before it is published and deleted only when the hub acknowledges it at the
application level, after its database commit (a broker PUBACK is no proof of storage). Entries
drain in order, per kind, with a window of unacknowledged entries in flight: when the oldest
unacknowledged entry was sent longer ago than the resend time, or after a reconnect, every
unacknowledged entry from it on is sent again (go-back-N). The resend time backs off: it starts
at `resend_after_s` and doubles with each resend that no ack followed, with +-25% jitter, up to
`resend_max_s`; an ack, or any sign that the hub is back (`hub_heard`), starts it again (and
resends at once what waited longer than `resend_after_s`). Meanwhile the oldest entry alone goes
out every `resend_after_s` as a probe, so that a returning hub is noticed within that. So a hub
that is down for a minute costs each entry two or three copies, not one every few seconds. The
hub ingests idempotently on the id, so a copy sent twice is stored once.

The outbox is bounded by entries, bytes and age. When full, `drop_oldest` deletes the oldest
entries, hard examples before result records, and `reject_new` refuses the new one; either way
every loss is counted (`dropped_full`, `dropped_expired`) and reported in telemetry.

`Outbox` holds that logic over a `Store`: `SqliteStore` (durable, the default) or `MemoryStore`
(for tests and for measuring the durable store's cost). See edge_agent/outbox_store.py.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from edge_agent.errors import AgentError
from edge_agent.outbox_store import Dropped, Entry, EntryKind, Store

log = logging.getLogger(__name__)

OverflowPolicy = Literal["drop_oldest", "reject_new"]


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    max_entries: int = 100_000
    max_bytes: int = 256 << 20
    max_age_s: float = 7 * 24 * 3600.0
    on_full: OverflowPolicy = "drop_oldest"


@dataclass(slots=True)
class _Lane:
    """Send state of one kind: go-back-N over the store's sequence numbers."""

    cursor: int = 0  # highest seq sent since the last go-back
    epoch: int = 0  # counts go-backs: a batch read before one is not marked sent after it
    sent: collections.deque[tuple[int, float]] = field(default_factory=collections.deque)
    inflight: int = 0  # entries sent and not acknowledged (seq <= cursor)
    backoff: int = 0  # go-backs since the last ack: the resend time is doubled this often
    jitter: float = 1.0
    probe_at: float = 0.0  # when the oldest entry alone last went out as a probe
    count: int = 0
    nbytes: int = 0
    produced: int = 0
    acked: int = 0


@dataclass(frozen=True, slots=True)
class OutboxStats:
    entries: int
    bytes: int
    results: int
    hard_examples: int
    oldest_age_s: float
    results_produced: int
    results_acked: int
    hard_produced: int
    hard_acked: int
    rejected: int
    dropped_full: int
    dropped_expired: int
    resent: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(frozen=True, slots=True)
class SendBatch:
    kind: EntryKind
    entries: list[Entry]
    epoch: int
    # The oldest entry alone, sent to find out whether the hub is back while the resends back
    # off: marking it sent moves nothing.
    probe: bool = False

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)


# The longest a resend waits, however long the hub has been silent.
RESEND_MAX_S = 120.0
# Each resend time is multiplied by a factor drawn in [1 - JITTER, 1 + JITTER].
JITTER = 0.25


def resend_delay(base_s: float, max_s: float, backoff: int, jitter: float = 1.0) -> float:
    """How long an unacknowledged entry waits after `backoff` resends without an ack."""
    return min(max_s, base_s * 2.0 ** min(backoff, 32)) * jitter


class OutboxFull(AgentError):
    """The outbox is full and its policy is `reject_new`."""


class Outbox:
    def __init__(self, store: Store, limits: OutboxLimits, resend_after_s: float,
                 resend_max_s: float = RESEND_MAX_S) -> None:
        self.store = store
        self.limits = limits
        self.resend_after_s = resend_after_s
        self.resend_max_s = max(resend_max_s, resend_after_s)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._lanes = {k: _Lane() for k in EntryKind}
        for kind, (n, nbytes) in store.totals().items():
            self._lanes[kind].count, self._lanes[kind].nbytes = n, nbytes
        self.rejected = 0
        self.dropped_full = self.dropped_expired = self.resent = 0
        self._closed: OutboxStats | None = None
        self.generation = 0  # grows on every add, ack and go-back: what the sender waits on
        if len(self):
            log.info("outbox holds %d entries from before the last stop; they are sent first",
                     len(self))

    # ------------------------------------------------------------------ producing

    def add(self, kind: EntryKind, entry_id: str, body: bytes) -> None:
        """Store an entry durably (as the store promises) before anything is published.

        Raises OutboxFull when full under `reject_new` (the loss is counted).
        """
        size = len(body)
        with self._lock:
            lane = self._lanes[kind]
            if self.limits.on_full == "reject_new" and self._over(1, size):
                self.dropped_full += 1
                raise OutboxFull(f"outbox full ({self._total()} entries, {self._bytes()} bytes)")
            self.store.append(Entry(self.store.next_seq(), kind, entry_id, time.time(), body))
            lane.count += 1
            lane.nbytes += size
            lane.produced += 1
            self._signal()

    def _total(self) -> int:
        return sum(lane.count for lane in self._lanes.values())

    def _bytes(self) -> int:
        return sum(lane.nbytes for lane in self._lanes.values())

    def _over(self, extra: int, extra_bytes: int) -> bool:
        return (self._total() + extra > self.limits.max_entries
                or self._bytes() + extra_bytes > self.limits.max_bytes)

    # ------------------------------------------------------------------ housekeeping

    def maintain(self, now: float | None = None) -> None:
        """Move journalled entries into the store, expire old ones, enforce the bounds."""
        now = time.time() if now is None else now
        self.store.flush()
        cutoff = now - self.limits.max_age_s
        oldest = self.store.oldest_ts()
        # Looked up by the oldest entry first: the search for expired rows scans the table.
        expired = (self.store.drop_older_than(cutoff) if oldest is not None and oldest < cutoff
                   else [])
        with self._lock:
            over = self._total() - self.limits.max_entries
            over_bytes = self._bytes() - self.limits.max_bytes
        full: Dropped = []
        if over > 0 or over_bytes > 0:
            # Hard examples give way first: they are large and only feed statistics and
            # retraining, while every result record is an answer the hub must know of.
            full = self.store.drop_oldest(over, over_bytes, EntryKind.HARD)
            over -= len(full)
            over_bytes -= sum(z for _, _, z in full)
            if over > 0 or over_bytes > 0:
                full += self.store.drop_oldest(over, over_bytes)
        if expired or full:
            with self._lock:
                for dropped in (expired, full):
                    for kind, seq, size in dropped:
                        self._forget(kind, seq, size)
                self.dropped_expired += len(expired)
                self.dropped_full += len(full)
                self._signal()
            if expired:
                log.warning("outbox: %d entries older than %.0f s expired unsent", len(expired),
                            self.limits.max_age_s)
            if full:
                log.warning("outbox full: dropped the %d oldest entries", len(full))

    def _forget(self, kind: EntryKind, seq: int, size: int) -> None:
        lane = self._lanes[kind]
        lane.count -= 1
        lane.nbytes -= size
        if seq <= lane.cursor:
            lane.inflight -= 1

    # ------------------------------------------------------------------ sending

    def due(self, kind: EntryKind, max_entries: int, max_bytes: int,
            max_inflight: int, now: float | None = None) -> SendBatch:
        """The next entries to send, in order; [] when the window is full or nothing is due.

        Goes back to the oldest unacknowledged entry when it waited longer than the resend time.
        """
        now = time.monotonic() if now is None else now
        self.store.flush()
        lane = self._lanes[kind]
        with self._lock:
            head = self.store.head(kind)
            while lane.sent and head is not None and lane.sent[0][0] < head:
                lane.sent.popleft()  # batches acknowledged in full
            wait = resend_delay(self.resend_after_s, self.resend_max_s, lane.backoff,
                                lane.jitter)
            if head is not None and head <= lane.cursor and lane.sent \
                    and now - lane.sent[0][1] >= wait:
                log.info("outbox: %s from #%d unacknowledged for %.1f s; sending again (next "
                         "resend after %.0f s without an ack)", kind.name.lower(), head,
                         now - lane.sent[0][1],
                         resend_delay(self.resend_after_s, self.resend_max_s, lane.backoff + 1))
                self._go_back(lane)
                lane.backoff += 1
                lane.jitter = random.uniform(1 - JITTER, 1 + JITTER)
            room = min(max_entries, max_inflight - lane.inflight)
            cursor, epoch = lane.cursor, lane.epoch
            # Backing off: the oldest entry alone every resend_after_s, so that a hub that comes
            # back is noticed within that (its ack starts the resends again), not after the
            # whole backoff.
            probe = (lane.backoff > 0 and head is not None and head <= lane.cursor
                     and now - lane.probe_at >= self.resend_after_s)
            if probe:
                lane.probe_at = now
                self.resent += 1
        if probe:
            assert head is not None
            return SendBatch(kind, self.store.read(kind, head - 1, 1, max_bytes), epoch, True)
        entries = self.store.read(kind, cursor, room, max_bytes) if room > 0 else []
        return SendBatch(kind, entries, epoch)

    def mark_sent(self, batch: SendBatch, now: float | None = None) -> None:
        if not batch.entries or batch.probe:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            lane = self._lanes[batch.kind]
            if batch.epoch != lane.epoch or batch.entries[0].seq <= lane.cursor:
                return  # a go-back happened while this batch was being published
            lane.cursor = batch.entries[-1].seq
            lane.inflight += len(batch.entries)
            lane.sent.append((lane.cursor, now))

    def resend_all(self) -> None:
        """After a reconnect: what was in flight may be lost; send it again from the oldest."""
        with self._lock:
            for lane in self._lanes.values():
                if lane.inflight:
                    self._go_back(lane)
            self._signal()

    def hub_heard(self, now: float | None = None) -> None:
        """The hub answered something (an offload): the resend backoff starts again, and what
        has waited longer than `resend_after_s` is sent again now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            woke = False
            for lane in self._lanes.values():
                if lane.backoff == 0:
                    continue
                lane.backoff = 0
                if lane.inflight and lane.sent and now - lane.sent[0][1] >= self.resend_after_s:
                    self._go_back(lane)
                    woke = True
            if woke:
                self._signal()

    def _go_back(self, lane: _Lane) -> None:
        self.resent += lane.inflight
        lane.epoch += 1
        lane.cursor = 0
        lane.inflight = 0
        lane.sent.clear()

    # ------------------------------------------------------------------ acknowledgements

    def ack(self, kind: EntryKind, ids: list[str], rejected: dict[str, str] | None = None) -> int:
        """Forget entries the hub committed or refused for good; returns how many were here."""
        rejected = rejected or {}
        done = self.store.delete(kind, list(ids))
        refused = self.store.delete(kind, list(rejected)) if rejected else []
        with self._lock:
            for seq, size in done + refused:
                self._forget(kind, seq, size)
            # Counted once, when they leave: a repeated ack finds nothing to count.
            self.rejected += len(refused)
            self._lanes[kind].acked += len(done)
            if done or refused:
                self._lanes[kind].backoff = 0
            self._signal()
        for i, why in list(rejected.items())[:3]:
            log.error("hub refused %s %s for good: %s", kind.name.lower(), i, why)
        return len(done) + len(refused)

    # ------------------------------------------------------------------ waiting and figures

    def poke(self) -> None:
        """Wake whoever waits for a change (an acknowledgement is waiting to be applied)."""
        with self._lock:
            self._signal()

    def _signal(self) -> None:
        """Something changed (caller holds the lock): wake the waiters."""
        self.generation += 1
        self._changed.notify_all()

    def wait_for_change(self, seen: int, timeout: float) -> int:
        """Wait until something was added, acknowledged or sent again since generation `seen`
        (or `timeout` passes); returns the generation now."""
        with self._lock:
            if self.generation == seen:
                self._changed.wait(timeout)
            return self.generation

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._total():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))
            return True

    @property
    def produced(self) -> int:
        """Result records stored since start."""
        return self._lanes[EntryKind.RESULT].produced

    @property
    def acked(self) -> int:
        """Result records the hub acknowledged since start."""
        return self._lanes[EntryKind.RESULT].acked

    def pending(self, kind: EntryKind) -> int:
        with self._lock:
            return self._lanes[kind].count

    def __len__(self) -> int:
        with self._lock:
            return self._total()

    def stats(self) -> OutboxStats:
        if self._closed is not None:
            return self._closed
        oldest = self.store.oldest_ts()
        with self._lock:
            return OutboxStats(
                entries=self._total(), bytes=self._bytes(),
                results=self._lanes[EntryKind.RESULT].count,
                hard_examples=self._lanes[EntryKind.HARD].count,
                oldest_age_s=max(0.0, time.time() - oldest) if oldest is not None else 0.0,
                results_produced=self._lanes[EntryKind.RESULT].produced,
                results_acked=self._lanes[EntryKind.RESULT].acked,
                hard_produced=self._lanes[EntryKind.HARD].produced,
                hard_acked=self._lanes[EntryKind.HARD].acked, rejected=self.rejected,
                dropped_full=self.dropped_full, dropped_expired=self.dropped_expired,
                resent=self.resent)

    def close(self) -> None:
        """Close the store; `stats()` keeps answering with the figures at this moment."""
        if self._closed is None:
            self.maintain()
            self._closed = self.stats()
            self.store.close()
