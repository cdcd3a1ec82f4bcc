"""The running sums ingest keeps are exactly the results stored: resends, duplicates within a
batch and two replicas writing at once change nothing."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from cloud_hub import rollups
from cloud_hub.db import (
    Result,
    ResultRollup,
    ResultRollupHour,
    init_db,
    make_engine,
    session_factory,
)
from cloud_hub.ingest import ingest_results
from cloud_hub.stats import compute_stats
from tests.cloud_hub.test_hub import record


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker]:
    eng = make_engine(database_url)
    init_db(eng)
    yield session_factory(eng)
    eng.dispose()


def test_sums_count_each_stored_result_once(sessions: sessionmaker) -> None:
    first = [record(i) for i in range(50)]
    assert len(ingest_results(sessions, first, "hub-a").inserted) == 50
    # A resend of 30 with 20 new, one of them twice in the batch, at another replica.
    again = [record(i) for i in range(20, 70)] + [record(60)]
    out = ingest_results(sessions, again, "hub-b")
    assert len(out.inserted) == 20 and len(out.duplicates) == 31
    with sessions() as s:
        stored = s.scalar(select(func.count()).select_from(Result))
        sums = rollups.read(s, by_group=False)
        replicas = set(s.scalars(select(ResultRollup.replica)))
        stats = compute_stats(s)
    assert stored == 70 and replicas == {"hub-a", "hub-b"}
    n, off, answered, agree, degraded, nbytes = sums.counts[0].tolist()
    want = [record(i) for i in range(70)]
    assert n == 70 and off == sum(r.offloaded for r in want) == answered
    assert agree == sum(r.offloaded and r.cloud_label == r.edge_label for r in want)
    assert nbytes == sum(r.offload_bytes for r in want) and degraded == 0
    assert int(sums.hist.sum()) == 70
    assert stats["total"]["count"] == 70 and stats["groups"][0]["count"] == 70
    # Latencies 0..6 ms: the percentiles are the bins of those values, within 2.2%.
    assert stats["total"]["latency_ms"]["p99"] == pytest.approx(6.0, rel=0.022)


def test_time_windows_select_whole_minutes(sessions: sessionmaker) -> None:
    # ts 1000 + i: minutes starting at 960, 1020, 1080.
    ingest_results(sessions, [record(i) for i in range(100)], "hub-a")
    with sessions() as s:
        assert compute_stats(s, since=1020)["total"]["count"] == 100 - 20
        assert compute_stats(s, since=1030)["total"]["count"] == 100 - 20  # its minute
        assert compute_stats(s, until=1020)["total"]["count"] == 20
        assert compute_stats(s, device="dev-2")["total"]["count"] == 0
        assert compute_stats(s)["resolution_s"] == rollups.BUCKET_S


def test_hour_rows_and_minute_rows_give_the_same_sums_for_every_window(
        sessions: sessionmaker) -> None:
    """Results over three hours from two replicas and two devices: every window, whether read
    from minutes alone, from hours with ragged minute ends or from hours alone, counts the
    results of exactly its minutes, with the same latency histogram."""
    recs = [record(i, device=f"dev-{i % 2}", ts=3000.0 + i * 97.3) for i in range(120)]
    ingest_results(sessions, recs[:70], "hub-a")
    ingest_results(sessions, recs[50:], "hub-b")  # 20 resent to the other replica
    with sessions() as s:
        hours = set(s.scalars(select(ResultRollupHour.bucket)))
        assert hours == {3600 * h for h in range(0, 5)}
        edges = [None, 0.0, 2999.0, 3600.0, 3650.0, 7199.9, 7200.0, 9000.0, 10800.0,
                 14000.0, 20000.0]
        for since in edges:
            for until in edges:
                if since is not None and until is not None and until <= since:
                    continue
                lo = -math.inf if since is None else since // 60 * 60
                hi = math.inf if until is None else math.ceil(until / 60) * 60
                want = [r for r in recs if lo <= r.ts // 60 * 60 < hi]
                sums = rollups.read(s, since=since, until=until, by_group=False)
                got = int(sums.counts[0][0]) if len(sums.counts) else 0
                assert got == len(want), (since, until)
                if want:
                    assert int(sums.hist.sum()) == len(want)
                    assert int(sums.counts[0][1]) == sum(r.offloaded for r in want)


def test_plan_reads_whole_hours_from_hour_rows() -> None:
    m, h = rollups.MINUTE, rollups.HOUR
    assert rollups.plan(None, None) == [(h, None, None)]
    assert rollups.plan(3600, 7200) == [(h, 3600, 7200)]
    assert rollups.plan(3000, 7300) == [(h, 3600, 7200), (m, 3000, 3600), (m, 7200, 7320)]
    assert rollups.plan(3650, 3700) == [(m, 3600, 3720)]  # inside one hour: minutes only
    assert rollups.plan(None, 3700) == [(h, None, 3600), (m, 3600, 3720)]
    first = rollups.plan(float("inf"), None)[0][1]
    assert first is not None and 1 << 62 <= first < 1 << 63  # within BIGINT: an empty window
