"""Where the outbox keeps its entries: SQLite on disk (durable), or memory (tests, comparisons).

`SqliteStore` copies each new entry into an append-only journal segment mapped into memory
(`mmap`, shared): once copied, the entry is in the kernel's page cache and survives `kill -9` of
the agent. The sender thread
moves journalled entries into SQLite (WAL mode) in one transaction per flush, then deletes the
segment; at start, segments left by a crash are replayed (insert-or-ignore on the id). One
SQLite commit per answer would cost more than the edge model itself on small models (11-26 µs
against 80 µs per input, docs/architecture.md); a `write()` system call per entry cost 8 µs
inside the agent; the copy into the mapping costs about one.

With `fsync=True` each journal record is flushed to the medium (`msync`) and SQLite runs with
`synchronous=FULL`: entries then also survive a power cut, at the price of a flush to the storage
medium per answer. Without it they survive crashes of the agent and clean reboots, and a power cut
may lose the entries of the last few seconds (the kernel's writeback interval).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import sqlite3
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple, Protocol

from edge_agent.errors import ConfigError

log = logging.getLogger(__name__)

# A journal record: body length, kind, id length, seq, ts; the id; the body; then the crc32 of
# everything before it. Zeros where a record would start end the segment.
_REC = struct.Struct("<IBBqd")
_CRC = struct.Struct("<I")
JOURNAL_GLOB = "journal-*.log"
# Rows looked at per step when dropping the oldest entries.
DROP_CHUNK = 512
# Size of a journal segment; one record larger than this gets a segment of its own.
SEGMENT_BYTES = 4 << 20
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value
# Rows per INSERT statement (6 parameters each, under SQLite's 32,766-parameter limit).
INSERT_ROWS = 2000


class EntryKind(IntEnum):
    RESULT = 0  # a result record (JSON)
    HARD = 1  # a hard example awaiting a (late) cloud answer


class Entry(NamedTuple):
    """One outbox entry (a tuple: the answering path makes one per input)."""

    seq: int
    kind: EntryKind
    id: str
    ts: float
    body: bytes


Dropped = list[tuple[EntryKind, int, int]]  # kind, seq, size


class Store(Protocol):
    def next_seq(self) -> int: ...

    def append(self, e: Entry) -> None:
        """Keep `e` (as durably as the store promises) before returning."""

    def flush(self) -> None:
        """Make appended entries visible to `read` (the journal into SQLite)."""

    def read(self, kind: EntryKind, after_seq: int, limit: int, max_bytes: int) -> list[Entry]:
        """Entries of `kind` with seq > after_seq, oldest first; at least one if any."""

    def head(self, kind: EntryKind) -> int | None: ...

    def delete(self, kind: EntryKind, ids: list[str]) -> list[tuple[int, int]]:
        """Delete entries by id; returns (seq, size) of those that were here."""

    def drop_older_than(self, ts: float) -> Dropped: ...

    def drop_oldest(self, entries: int, nbytes: int, kind: EntryKind | None = None) -> Dropped:
        """Delete the oldest entries (of `kind`, or of any) until `entries` entries and `nbytes`
        bytes are gone, or none is left."""

    def oldest_ts(self) -> float | None: ...

    def totals(self) -> dict[EntryKind, tuple[int, int]]: ...

    def close(self) -> None: ...


class MemoryStore:
    """Entries in memory: lost with the process. For tests and for measuring SqliteStore."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._lanes: dict[EntryKind, OrderedDict[str, Entry]] = {k: OrderedDict()
                                                                  for k in EntryKind}

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def append(self, e: Entry) -> None:
        with self._lock:
            self._lanes[e.kind].setdefault(e.id, e)

    def flush(self) -> None:
        pass

    def read(self, kind: EntryKind, after_seq: int, limit: int, max_bytes: int) -> list[Entry]:
        out: list[Entry] = []
        size = 0
        with self._lock:
            for e in self._lanes[kind].values():
                if e.seq <= after_seq:
                    continue
                if out and (len(out) >= limit or size + len(e.body) > max_bytes):
                    break
                out.append(e)
                size += len(e.body)
        return out

    def head(self, kind: EntryKind) -> int | None:
        with self._lock:
            lane = self._lanes[kind]
            return next(iter(lane.values())).seq if lane else None

    def delete(self, kind: EntryKind, ids: list[str]) -> list[tuple[int, int]]:
        out = []
        with self._lock:
            for i in ids:
                e = self._lanes[kind].pop(i, None)
                if e is not None:
                    out.append((e.seq, len(e.body)))
        return out

    def _oldest_first(self) -> list[Entry]:
        return sorted((e for lane in self._lanes.values() for e in lane.values()),
                      key=lambda e: e.seq)

    def drop_older_than(self, ts: float) -> Dropped:
        with self._lock:
            gone = [e for e in self._oldest_first() if e.ts < ts]
            for e in gone:
                del self._lanes[e.kind][e.id]
        return [(e.kind, e.seq, len(e.body)) for e in gone]

    def drop_oldest(self, entries: int, nbytes: int, kind: EntryKind | None = None) -> Dropped:
        out: Dropped = []
        with self._lock:
            for e in self._oldest_first():
                if len(out) >= entries and nbytes <= 0:
                    break
                if kind is not None and e.kind is not kind:
                    continue
                del self._lanes[e.kind][e.id]
                out.append((e.kind, e.seq, len(e.body)))
                nbytes -= len(e.body)
        return out

    def oldest_ts(self) -> float | None:
        with self._lock:
            heads = [next(iter(lane.values())).ts for lane in self._lanes.values() if lane]
        return min(heads) if heads else None

    def totals(self) -> dict[EntryKind, tuple[int, int]]:
        with self._lock:
            return {k: (len(lane), sum(len(e.body) for e in lane.values()))
                    for k, lane in self._lanes.items()}

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    id TEXT NOT NULL,
    ts REAL NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (kind, id)
);
CREATE INDEX IF NOT EXISTS entries_kind_seq ON entries (kind, seq);
-- How far the journal has been moved into the entries table: segment number and byte offset.
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    segment INTEGER NOT NULL,
    offset INTEGER NOT NULL
);
"""


class SqliteStore:
    """Entries in `directory`: `outbox.db` (SQLite, WAL) plus journal segments not yet moved."""

    def __init__(self, directory: Path, fsync: bool = False) -> None:
        self.dir = directory
        self.fsync = fsync
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lockfile = open(directory / "outbox.lock", "a+")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"cannot use outbox folder {directory}: {exc}") from None
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lockfile.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"outbox folder {directory} is in use by another agent; give "
                                  "each agent its own results.outbox_dir") from None
            raise
        self._db_lock = threading.Lock()
        self._db = sqlite3.connect(directory / "outbox.db", isolation_level=None,
                                   check_same_thread=False)
        # One process owns the file (the lock above): exclusive locking skips the shared-memory
        # index and makes each transaction cheaper.
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        (top,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM entries").fetchone()
        self._seq = int(top)
        self._jlock = threading.Lock()
        self._pending: list[Entry] = []
        self._segment_no = 0
        self._replay_journal()
        self._journal = self._new_segment(SEGMENT_BYTES)
        self._sealed: list[_Segment] = []

    # ------------------------------------------------------------------ journal

    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob(JOURNAL_GLOB), key=lambda p: int(p.stem.split("-")[1]))

    def _new_segment(self, size: int) -> _Segment:
        self._segment_no += 1
        return _Segment(self.dir / f"journal-{self._segment_no}.log", self._segment_no, size)

    def _replay_journal(self) -> None:
        """Move what a crash left in the journal into SQLite: what lies past the mark of the
        last flush (entries before it are in SQLite already, or acknowledged and gone)."""
        mark = self._db.execute("SELECT segment, offset FROM journal").fetchone()
        done_seg, done_at = (int(mark[0]), int(mark[1])) if mark else (0, 0)
        self._segment_no = done_seg
        segments = self._segments()
        entries: list[Entry] = []
        for path in segments:
            no = int(path.stem.split("-")[1])
            self._segment_no = max(self._segment_no, no)
            if no > done_seg:
                entries.extend(read_journal(path))
            elif no == done_seg:
                entries.extend(read_journal(path, done_at))
        if entries:
            self._insert(entries)
            log.info("outbox: recovered %d entries from the journal", len(entries))
            self._seq = max(self._seq, max(e.seq for e in entries))
        for path in segments:
            path.unlink()

    def next_seq(self) -> int:
        self._seq += 1  # callers serialise (the outbox's lock)
        return self._seq

    def append(self, e: Entry) -> None:
        # The hot path of every answer: kept to a few C calls.
        ident = e.id.encode()
        head = _REC.pack(len(e.body), e.kind, len(ident), e.seq, e.ts) + ident
        crc = _CRC.pack(zlib.crc32(e.body, zlib.crc32(head)))
        n = len(head) + len(e.body) + len(crc)
        with self._jlock:
            j = self._journal
            if j.pos + n > j.size:
                j.seal()
                self._sealed.append(j)
                j = self._journal = self._new_segment(max(SEGMENT_BYTES, n))
            # In parts, not joined: a hard example's tensor is copied once, into the mapping.
            j.write((head, e.body, crc), n, self.fsync)
            self._pending.append(e)

    def flush(self) -> None:
        """Move journalled entries into SQLite, with the journal position they end at, in one
        transaction. The segment stays in use until full: a new one per flush would cost its
        page faults every time."""
        with self._jlock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            sealed, self._sealed = self._sealed, []
            mark = (self._journal.no, self._journal.pos)
        self._insert(batch, mark)
        for seg in sealed:
            seg.path.unlink()

    def _insert(self, entries: list[Entry], mark: tuple[int, int] | None = None) -> None:
        # Many rows per statement: the sqlite3 module releases the GIL around every step, and
        # under a busy inference thread each release costs a GIL hand-off (executemany, one step
        # per row, made the agent's answers 15 µs slower).
        with self._db_lock, self._tx():
            for k in range(0, len(entries), INSERT_ROWS):
                chunk = entries[k:k + INSERT_ROWS]
                params: list[object] = []
                for e in chunk:
                    params += (e.seq, int(e.kind), e.id, e.ts, len(e.body), e.body)
                self._db.execute("INSERT OR IGNORE INTO entries VALUES "
                                 + ",".join(["(?,?,?,?,?,?)"] * len(chunk)), params)
            if mark is not None:
                self._db.execute("INSERT OR REPLACE INTO journal VALUES (1, ?, ?)", mark)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ queries

    def read(self, kind: EntryKind, after_seq: int, limit: int, max_bytes: int) -> list[Entry]:
        out: list[Entry] = []
        size = 0
        with self._db_lock:
            cur = self._db.execute(
                "SELECT seq, id, ts, body FROM entries WHERE kind=? AND seq>? ORDER BY seq "
                "LIMIT ?", (int(kind), after_seq, limit))
            for seq, ident, ts, body in cur:
                if out and size + len(body) > max_bytes:
                    break
                out.append(Entry(seq, kind, ident, ts, bytes(body)))
                size += len(body)
        return out

    def head(self, kind: EntryKind) -> int | None:
        with self._db_lock:
            (h,) = self._db.execute("SELECT MIN(seq) FROM entries WHERE kind=?",
                                    (int(kind),)).fetchone()
        return None if h is None else int(h)

    def delete(self, kind: EntryKind, ids: list[str]) -> list[tuple[int, int]]:
        if not ids:
            return []
        out: list[tuple[int, int]] = []
        with self._db_lock, self._tx():
            for k in range(0, len(ids), DROP_CHUNK):
                chunk = ids[k:k + DROP_CHUNK]
                marks = ",".join("?" * len(chunk))
                out.extend((int(s), int(z)) for s, z in self._db.execute(
                    f"DELETE FROM entries WHERE kind=? AND id IN ({marks}) RETURNING seq, size",
                    (int(kind), *chunk)).fetchall())
        return out

    def _drop_rows(self, rows: list[tuple[int, int, int]]) -> Dropped:
        self._db.executemany("DELETE FROM entries WHERE seq=?", [(r[0],) for r in rows])
        return [(EntryKind(k), s, z) for s, k, z in rows]

    def drop_older_than(self, ts: float) -> Dropped:
        out: Dropped = []
        with self._db_lock, self._tx():
            while True:
                rows = [(int(s), int(k), int(z)) for s, k, z in self._db.execute(
                    "SELECT seq, kind, size FROM entries WHERE ts<? ORDER BY seq LIMIT ?",
                    (ts, DROP_CHUNK))]
                if not rows:
                    return out
                self._db.executemany("DELETE FROM entries WHERE seq=?", [(r[0],) for r in rows])
                out.extend((EntryKind(k), s, z) for s, k, z in rows)

    def drop_oldest(self, entries: int, nbytes: int, kind: EntryKind | None = None) -> Dropped:
        out: Dropped = []
        where = "" if kind is None else f"WHERE kind={int(kind)} "
        with self._db_lock, self._tx():
            while len(out) < entries or nbytes > 0:
                rows = self._db.execute(f"SELECT seq, kind, size FROM entries {where}"
                                        "ORDER BY seq LIMIT ?", (DROP_CHUNK,)).fetchall()
                if not rows:
                    break
                take: list[tuple[int, int, int]] = []
                for s, k, z in rows:
                    if len(out) + len(take) >= entries and nbytes <= 0:
                        break
                    take.append((int(s), int(k), int(z)))
                    nbytes -= int(z)
                out.extend(self._drop_rows(take))
        return out

    def oldest_ts(self) -> float | None:
        with self._db_lock:
            (ts,) = self._db.execute("SELECT ts FROM entries ORDER BY seq LIMIT 1").fetchone() \
                or (None,)
        with self._jlock:
            if ts is None and self._pending:
                ts = self._pending[0].ts
        return None if ts is None else float(ts)

    def totals(self) -> dict[EntryKind, tuple[int, int]]:
        out = dict.fromkeys(EntryKind, (0, 0))
        with self._db_lock:
            for k, n, b in self._db.execute(
                    "SELECT kind, COUNT(*), COALESCE(SUM(size), 0) FROM entries GROUP BY kind"):
                out[EntryKind(k)] = (int(n), int(b))
        return out

    def close(self) -> None:
        self.flush()
        with self._jlock:
            self._journal.seal()
            self._journal.path.unlink(missing_ok=True)
        with self._db_lock:
            self._db.close()
        fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        self._lockfile.close()


class _Segment:
    """A journal file mapped into memory: an append is a copy into the page cache, which the
    kernel keeps (and writes back) when the process dies. The file is created at its full size
    (sparse); the zeros after the last record end it."""

    def __init__(self, path: Path, no: int, size: int) -> None:
        self.path = path
        self.no = no
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map: mmap.mmap | None = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError, ValueError):
            # Take the page faults now (in the sender thread) rather than one per page on the
            # answering thread's path (Linux 5.14+; elsewhere they are taken as pages fill).
            self.map.madvise(MADV_POPULATE_WRITE)
        self.size = size
        self.pos = 0

    def write(self, parts: tuple[bytes, ...], n: int, sync: bool) -> None:
        assert self.map is not None
        end = self.pos + n
        at = self.pos
        for part in parts:
            self.map[at:at + len(part)] = part
            at += len(part)
        if sync:
            # msync wants page-aligned offsets: flush the pages this record touched.
            start = self.pos - self.pos % mmap.PAGESIZE
            self.map.flush(start, end - start)
        self.pos = end

    def seal(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None


def read_journal(path: Path, start: int = 0) -> list[Entry]:
    """The entries of a journal segment from byte `start`, up to the first torn or corrupt
    record."""
    data = path.read_bytes()
    out: list[Entry] = []
    pos = start
    while pos + _REC.size <= len(data):
        blen, kind, ilen, seq, ts = _REC.unpack_from(data, pos)
        if blen == kind == ilen == seq == 0:
            break  # the unwritten rest of the segment
        end = pos + _REC.size + ilen + blen
        if (end + _CRC.size > len(data) or kind not in (0, 1)
                or zlib.crc32(data[pos:end]) != _CRC.unpack_from(data, end)[0]):
            log.warning("journal %s: a torn record at byte %d; %d entries before it kept",
                        path.name, pos, len(out))
            break
        start = pos + _REC.size
        ident = data[start:start + ilen].decode()
        out.append(Entry(seq, EntryKind(kind), ident, ts, data[start + ilen:end]))
        pos = end + _CRC.size
    return out
