"""The outbox: order, acknowledgement, resend, bounds, and durability across kill -9."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge_agent.errors import ConfigError
from edge_agent.outbox import Outbox, OutboxFull, OutboxLimits
from edge_agent.outbox_store import EntryKind, MemoryStore, SqliteStore, Store, read_journal

R, H = EntryKind.RESULT, EntryKind.HARD
BIG = 1 << 30


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    opened: list[Store] = []

    def make() -> Store:
        s: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "ob")
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def drain(ob: Outbox, kind: EntryKind = R) -> list[str]:
    """Send and acknowledge everything of `kind`; the ids in the order they were sent."""
    out: list[str] = []
    while batch := ob.due(kind, 7, BIG, BIG):
        ob.mark_sent(batch)
        ob.ack(kind, batch.ids)
        out += batch.ids
    return out


def test_entries_drain_in_order_per_kind(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(), resend_after_s=5)
    for i in range(20):
        ob.add(R if i % 3 else H, f"e{i}", b"x" * i)
    assert drain(ob, R) == [f"e{i}" for i in range(20) if i % 3]
    assert drain(ob, H) == [f"e{i}" for i in range(20) if not i % 3]
    assert len(ob) == 0 and ob.stats().results_acked == 13 and ob.stats().hard_acked == 7


def test_unacknowledged_entries_are_sent_again_from_the_oldest(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(), resend_after_s=5)
    for i in range(6):
        ob.add(R, f"r{i}", b"{}")
    first = ob.due(R, 3, BIG, BIG, now=100.0)
    ob.mark_sent(first, now=100.0)
    second = ob.due(R, 3, BIG, BIG, now=101.0)
    ob.mark_sent(second, now=101.0)
    assert first.ids == ["r0", "r1", "r2"] and second.ids == ["r3", "r4", "r5"]
    ob.ack(R, ["r1", "r4"])  # a partial acknowledgement: r0 still owed
    assert not ob.due(R, 10, BIG, BIG, now=104.0)  # in flight, not yet overdue
    again = ob.due(R, 10, BIG, BIG, now=105.5)
    assert again.ids == ["r0", "r2", "r3", "r5"]  # go back to the oldest, in order
    assert ob.stats().resent == 4


def test_reconnect_resends_in_flight_and_a_stale_batch_is_not_marked(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(), resend_after_s=60)
    for i in range(4):
        ob.add(R, f"r{i}", b"{}")
    b1 = ob.due(R, 2, BIG, BIG)
    ob.mark_sent(b1)
    b2 = ob.due(R, 2, BIG, BIG)  # read, then the connection drops before it is marked
    ob.resend_all()
    ob.mark_sent(b2)  # stale: must not move the cursor past r0, r1
    assert ob.due(R, 10, BIG, BIG).ids == ["r0", "r1", "r2", "r3"]


def test_window_limits_entries_in_flight(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(), resend_after_s=60)
    for i in range(10):
        ob.add(R, f"r{i}", b"{}")
    b = ob.due(R, 100, BIG, 4)
    ob.mark_sent(b)
    assert len(b) == 4 and not ob.due(R, 100, BIG, 4)
    ob.ack(R, b.ids[:2])
    assert ob.due(R, 100, BIG, 4).ids == ["r4", "r5"]


def test_batches_respect_max_bytes_but_never_starve(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(), resend_after_s=60)
    ob.add(R, "huge", b"x" * 1000)
    ob.add(R, "a", b"x" * 10)
    ob.add(R, "b", b"x" * 10)
    assert ob.due(R, 100, 100, BIG).ids == ["huge"]  # alone, rather than stuck forever
    assert ob.due(R, 100, 1200, BIG).ids == ["huge", "a", "b"]


def test_drop_oldest_counts_every_loss(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(max_entries=5, on_full="drop_oldest"), 60)
    for i in range(8):
        ob.add(R, f"r{i}", b"{}")
    ob.maintain()
    assert len(ob) == 5 and ob.stats().dropped_full == 3
    assert drain(ob) == [f"r{i}" for i in range(3, 8)]


def test_drop_oldest_by_bytes(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(max_bytes=250, on_full="drop_oldest"), 60)
    for i in range(5):
        ob.add(H, f"h{i}", b"x" * 100)
    ob.maintain()
    assert ob.stats().bytes <= 250 and ob.stats().dropped_full == 3
    assert drain(ob, H) == ["h3", "h4"]


def test_reject_new_refuses_and_counts(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(max_entries=3, on_full="reject_new"), 60)
    for i in range(3):
        ob.add(R, f"r{i}", b"{}")
    with pytest.raises(OutboxFull):
        ob.add(R, "r3", b"{}")
    assert ob.stats().dropped_full == 1
    assert drain(ob) == ["r0", "r1", "r2"]
    ob.add(R, "r4", b"{}")  # room again
    assert len(ob) == 1


def test_entries_past_max_age_expire_and_are_counted(make_store) -> None:
    import time

    ob = Outbox(make_store(), OutboxLimits(max_age_s=60), 60)
    for i in range(3):
        ob.add(R, f"r{i}", b"{}")
    ob.maintain(now=time.time() + 30)
    assert len(ob) == 3
    ob.maintain(now=time.time() + 61)
    assert len(ob) == 0 and ob.stats().dropped_expired == 3


def test_hub_refusals_leave_the_queue_and_are_counted(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(), 60)
    for i in range(3):
        ob.add(R, f"r{i}", b"{}")
    b = ob.due(R, 10, BIG, BIG)
    ob.mark_sent(b)
    ob.ack(R, ["r0", "r2"], {"r1": "latency_ms: must be >= 0"})
    s = ob.stats()
    assert len(ob) == 0 and s.rejected == 1 and s.results_acked == 2


def test_sqlite_store_survives_reopen_in_order(tmp_path: Path) -> None:
    ob = Outbox(SqliteStore(tmp_path / "ob"), OutboxLimits(), 60)
    for i in range(5):
        ob.add(R, f"r{i}", f"body{i}".encode())
    ob.maintain()  # some in SQLite
    for i in range(5, 8):
        ob.add(R, f"r{i}", f"body{i}".encode())  # some only in the journal
    ob.mark_sent(ob.due(R, 2, BIG, BIG))
    ob.ack(R, ["r0"])
    ob.close()
    ob2 = Outbox(SqliteStore(tmp_path / "ob"), OutboxLimits(), 60)
    try:
        assert len(ob2) == 7
        b = ob2.due(R, 100, BIG, BIG)
        assert b.ids == [f"r{i}" for i in range(1, 8)]
        assert [e.body for e in b.entries][-1] == b"body7"
        ob2.add(R, "r8", b"{}")
        assert drain(ob2)[-1] == "r8"  # new entries sort after the recovered ones
    finally:
        ob2.close()


def test_second_agent_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "ob")
    try:
        with pytest.raises(ConfigError, match="in use by another agent"):
            SqliteStore(tmp_path / "ob")
    finally:
        s.close()


_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from edge_agent.outbox import Outbox, OutboxLimits
    from edge_agent.outbox_store import EntryKind, SqliteStore
    ob = Outbox(SqliteStore(Path(sys.argv[1])), OutboxLimits(), 60)
    n = int(sys.argv[2])
    for i in range(n):
        ob.add(EntryKind.RESULT, f"r{i:05d}", b"x" * (i % 50))
        if i == n // 2:
            ob.maintain()  # half moved into SQLite, half only in the journal
    print("added", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_entries_survive_kill_9_of_the_writer(tmp_path: Path) -> None:
    d = tmp_path / "ob"
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(d), "3000"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "added" in proc.stdout
    ob = Outbox(SqliteStore(d), OutboxLimits(), 60)
    try:
        assert drain(ob) == [f"r{i:05d}" for i in range(3000)]
    finally:
        ob.close()


def test_a_torn_journal_tail_keeps_the_entries_before_it(tmp_path: Path) -> None:
    d = tmp_path / "ob"
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(d), "10"], capture_output=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (seg,) = sorted(d.glob("journal-*.log"))
    data = bytearray(seg.read_bytes())
    n = len(read_journal(seg))
    end = len(data.rstrip(b"\x00"))
    data[end - 1] ^= 0xFF  # a power cut mid-record: its last byte never reached the disk
    seg.write_bytes(bytes(data))
    assert len(read_journal(seg)) == n - 1
    ob = Outbox(SqliteStore(d), OutboxLimits(), 60)
    try:
        assert len(ob) == 10 - 1
    finally:
        ob.close()


# ---------------------------------------------------------------------------- property tests


class OutboxMachine(RuleBasedStateMachine):
    """Whatever the interleaving of adds, sends, acks, lost connections and restarts: every
    entry not acknowledged is still there, each kind drains in order, and nothing acknowledged
    comes back."""

    store_kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-prop-"))
        self.ob = self._open()
        self.n = 0
        self.owed: dict[EntryKind, list[str]] = {R: [], H: []}  # in add order
        self.acked: set[str] = set()
        self.inflight: dict[EntryKind, list[str]] = {R: [], H: []}
        self.clock = 1000.0

    def _open(self) -> Outbox:
        store: Store = (MemoryStore() if self.store_kind == "memory"
                        else SqliteStore(self.dir / "ob"))
        return Outbox(store, OutboxLimits(), resend_after_s=10)

    @rule(kind=st.sampled_from([R, H]), size=st.integers(0, 40))
    def add(self, kind: EntryKind, size: int) -> None:
        eid = f"e{self.n}"
        self.n += 1
        self.ob.add(kind, eid, b"b" * size)
        self.owed[kind].append(eid)

    @rule(kind=st.sampled_from([R, H]), k=st.integers(1, 5), window=st.integers(1, 8))
    def send(self, kind: EntryKind, k: int, window: int) -> None:
        b = self.ob.due(kind, k, BIG, window, now=self.clock)
        ids = b.ids
        assert not set(ids) & self.acked, "an acknowledged entry came back"
        owed = self.owed[kind]
        pos = [owed.index(i) for i in ids]
        assert pos == sorted(pos), "entries left out of order"
        self.ob.mark_sent(b, now=self.clock)
        self.inflight[kind] += ids

    @precondition(lambda self: self.inflight[R] or self.inflight[H])
    @rule(data=st.data())
    def ack_some(self, data: st.DataObject) -> None:
        kind = R if self.inflight[R] else H
        ids = data.draw(st.lists(st.sampled_from(self.inflight[kind]), max_size=6, unique=True))
        self.ob.ack(kind, ids)
        for i in ids:
            if i in self.owed[kind]:
                self.owed[kind].remove(i)
            self.acked.add(i)
            self.inflight[kind] = [x for x in self.inflight[kind] if x != i]

    @rule()
    def connection_lost(self) -> None:
        self.ob.resend_all()
        self.inflight = {R: [], H: []}

    @rule(dt=st.floats(0, 15))
    def time_passes(self, dt: float) -> None:
        self.clock += dt

    @rule()
    def housekeeping(self) -> None:
        self.ob.maintain()

    @rule()
    def restart(self) -> None:
        self.ob.close()
        self.ob = self._open()
        self.inflight = {R: [], H: []}

    @invariant()
    def everything_owed_is_kept(self) -> None:
        for kind in (R, H):
            assert self.ob.pending(kind) == len(self.owed[kind])

    @invariant()
    def a_full_resend_returns_what_is_owed_in_order(self) -> None:
        for kind in (R, H):
            if len(self.owed[kind]) > 200:
                continue
            self.ob.store.flush()
            got = self.ob.store.read(kind, 0, 10_000, BIG)
            assert [e.id for e in got] == self.owed[kind]

    def teardown(self) -> None:
        self.ob.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class MemoryOutboxMachine(OutboxMachine):
    store_kind = "memory"

    @rule()
    def restart(self) -> None:
        pass  # nothing survives a restart in memory


class SqliteOutboxMachine(OutboxMachine):
    store_kind = "sqlite"


_PROP = settings(max_examples=40, stateful_step_count=40, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
TestMemoryOutbox = MemoryOutboxMachine.TestCase
TestMemoryOutbox.settings = _PROP
TestSqliteOutbox = SqliteOutboxMachine.TestCase
TestSqliteOutbox.settings = _PROP


def test_hard_examples_give_way_to_results_when_full(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(max_bytes=1000, on_full="drop_oldest"), 60)
    for i in range(3):
        ob.add(H, f"h{i}", b"x" * 300)
        ob.add(R, f"r{i}", b"x" * 50)
    ob.maintain()
    assert ob.stats().bytes <= 1000 and ob.stats().dropped_full == 1
    assert drain(ob, H) == ["h1", "h2"] and drain(ob, R) == ["r0", "r1", "r2"]


_ACK_THEN_DIE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from edge_agent.outbox import Outbox, OutboxLimits
    from edge_agent.outbox_store import EntryKind, SqliteStore
    ob = Outbox(SqliteStore(Path(sys.argv[1])), OutboxLimits(), 60)
    for i in range(10):
        ob.add(EntryKind.RESULT, f"r{i}", b"{}")
    ob.maintain()  # into SQLite; the journal segment stays in use
    ob.ack(EntryKind.RESULT, [f"r{i}" for i in range(5)])
    for i in range(10, 13):
        ob.add(EntryKind.RESULT, f"r{i}", b"{}")
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_acknowledged_entries_do_not_come_back_after_a_crash(tmp_path: Path) -> None:
    d = tmp_path / "ob"
    proc = subprocess.run([sys.executable, "-c", _ACK_THEN_DIE, str(d)], capture_output=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ob = Outbox(SqliteStore(d), OutboxLimits(), 60)
    try:
        assert drain(ob) == [f"r{i}" for i in (5, 6, 7, 8, 9, 10, 11, 12)]
    finally:
        ob.close()


def test_a_repeated_acknowledgement_is_counted_once(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(), 60)
    for i in range(3):
        ob.add(R, f"r{i}", b"{}")
    ob.mark_sent(ob.due(R, 10, BIG, BIG))
    assert ob.ack(R, ["r0", "r1"], {"r2": "bad"}) == 3
    assert ob.ack(R, ["r0", "r1"], {"r2": "bad"}) == 0  # the hub's ack arrived twice
    s = ob.stats()
    assert (s.results_acked, s.rejected) == (2, 1)


def test_resends_back_off_with_jitter_up_to_a_cap_and_start_again_on_an_ack(
        make_store) -> None:
    """Without acks, each resend waits twice as long as the one before (+-25%), up to the cap:
    a silent hub costs each entry a few copies, not one every resend_after_s."""
    ob = Outbox(make_store(), OutboxLimits(), resend_after_s=5, resend_max_s=40)
    for i in range(3):
        ob.add(R, f"r{i}", b"{}")
    t = 100.0
    ob.mark_sent(ob.due(R, 10, BIG, BIG, now=t), now=t)
    probes = 0
    for delay in (5, 10, 20, 40, 40):
        # Before the resend is due, at most the oldest entry alone (a probe for the hub).
        early = ob.due(R, 10, BIG, BIG, now=t + 0.75 * delay - 0.01)
        assert not early or (early.probe and early.ids == ["r0"])
        probes += bool(early)
        t += 1.25 * delay + 0.01
        again = ob.due(R, 10, BIG, BIG, now=t)
        assert again.ids == ["r0", "r1", "r2"] and not again.probe
        ob.mark_sent(again, now=t)
    assert ob.stats().resent == 15 + probes
    ob.ack(R, ["r0"])  # the hub is back: the next resend waits resend_after_s again
    assert ob.due(R, 10, BIG, BIG, now=t + 1.25 * 5 + 0.01).ids == ["r1", "r2"]


def test_an_answer_from_the_hub_resends_what_waited_at_once(make_store) -> None:
    ob = Outbox(make_store(), OutboxLimits(), resend_after_s=5, resend_max_s=600)
    ob.add(R, "r0", b"{}")
    ob.mark_sent(ob.due(R, 10, BIG, BIG, now=100.0), now=100.0)
    t = 100.0
    for delay in (5, 10, 20):
        t += 1.25 * delay + 0.01
        ob.mark_sent(ob.due(R, 10, BIG, BIG, now=t), now=t)
    early = ob.due(R, 10, BIG, BIG, now=t + 6)  # backed off to 40 s: only a probe
    assert early.probe and early.ids == ["r0"]
    ob.hub_heard(now=t + 6)
    assert ob.due(R, 10, BIG, BIG, now=t + 6).ids == ["r0"]


def test_resend_delay_arithmetic() -> None:
    from edge_agent.outbox import resend_delay

    assert [resend_delay(5, 120, k) for k in range(7)] == [5, 10, 20, 40, 80, 120, 120]
    assert resend_delay(5, 120, 10_000) == 120  # no overflow however long the outage
    assert resend_delay(5, 120, 1, jitter=0.8) == 8.0


def test_while_backing_off_the_oldest_entry_alone_probes_for_the_hub(make_store) -> None:
    """Between backed-off resends, the oldest entry goes out alone every resend_after_s; its
    ack (the hub is back) makes the next call send everything owed at once."""
    ob = Outbox(make_store(), OutboxLimits(), resend_after_s=5, resend_max_s=600)
    for i in range(4):
        ob.add(R, f"r{i}", b"{}")
    t = 100.0
    ob.mark_sent(ob.due(R, 10, BIG, BIG, now=t), now=t)
    for delay in (5, 10, 20):  # three resends without an ack: the next waits 40 s
        t += 1.25 * delay + 0.01
        ob.mark_sent(ob.due(R, 10, BIG, BIG, now=t), now=t)
    probe = ob.due(R, 10, BIG, BIG, now=t + 5.5)
    assert probe.probe and probe.ids == ["r0"]
    ob.mark_sent(probe, now=t + 5.5)  # moves nothing
    assert not ob.due(R, 10, BIG, BIG, now=t + 6)  # one probe per resend_after_s
    assert ob.due(R, 10, BIG, BIG, now=t + 11).ids == ["r0"]
    ob.ack(R, ["r0"])  # the hub answered the probe
    assert ob.due(R, 10, BIG, BIG, now=t + 11.1).ids == ["r1", "r2", "r3"]
