"""Storing many devices' messages together without letting one of them cost the others.

Messages are stored in one transaction when they can be. If that fails, whatever the exception
(SQLAlchemy's, or a driver's that it does not wrap, such as a value COPY cannot write), it is
first judged: a transient failure (an operational error: the connection, a lock timeout, a
deadlock or serialization failure) or a database that does not answer a trivial query refuses
nothing, and the caller backs off (devices send again what was not acknowledged). Otherwise
the messages are split in halves and each half stored alone, until only the messages that fail
alone remain; each of those is tried once more and refused: counted, logged, and never holding
back another device's data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from cloud_hub.metrics import HubMetrics
from cloud_hub.supervisor import Backoff

log = logging.getLogger(__name__)

T = TypeVar("T")


def database_answers(sessions: sessionmaker) -> bool:
    """True if the database runs a trivial query: a failure was the data's, not its own."""
    try:
        with sessions() as s:
            s.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def transient(exc: BaseException) -> bool:
    """True for a failure of the database rather than of the data: SQLAlchemy's or a driver's
    OperationalError (connection lost, database locked, lock timeout, deadlock, serialization
    failure), anywhere in the exception's chain (StoreError keeps it as its context)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OperationalError | TimeoutError | ConnectionError):
            return True
        if type(e).__name__ in ("OperationalError", "TransactionRollbackError",
                                "DeadlockDetected", "SerializationFailure", "LockNotAvailable"):
            return True  # a DB-API driver's own (sqlite3, psycopg), not wrapped
        e = e.__cause__ or e.__context__
    return False


def store_apart(items: Sequence[T], store: Callable[[Sequence[T]], None],
                refuse: Callable[[T, Exception], None],
                answers: Callable[[], bool]) -> bool:
    """Store `items` together, or apart as far as needed; refuse those that fail alone.

    Returns False when the database does not answer (the caller backs off; the items not
    stored are neither acknowledged nor refused)."""
    if not items:
        return True
    try:
        store(items)
        return True
    except Exception as exc:  # whatever it is, the split finds the culprit
        failure = exc
    if transient(failure) or not answers():
        log.error("database does not answer: %d messages not stored now (%s)", len(items),
                  failure)
        return False
    if len(items) == 1:
        try:
            store(items)
            return True
        except Exception as exc:
            if transient(exc) or not answers():
                return False
            refuse(items[0], exc)
            return True
    mid = len(items) // 2
    return (store_apart(items[:mid], store, refuse, answers)
            and store_apart(items[mid:], store, refuse, answers))


# While the database does not answer: the first pause, and the longest (doubling between).
OUTAGE_PAUSE_S = 0.2
OUTAGE_PAUSE_MAX_S = 5.0


class OutageBackoff:
    """A worker's pause while its database does not answer: doubling from OUTAGE_PAUSE_S to
    OUTAGE_PAUSE_MAX_S, back to none after a step that stored what it took."""

    def __init__(self, metrics: HubMetrics) -> None:
        self.metrics = metrics
        self.pause = 0.0

    def settle(self, ok: bool) -> None:
        """After a step: nothing if it stored what it took, else count and raise Backoff."""
        if ok:
            self.pause = 0.0
            return
        self.metrics.store_errors.inc()
        self.pause = min(OUTAGE_PAUSE_MAX_S, max(OUTAGE_PAUSE_S, 2 * self.pause))
        raise Backoff(self.pause)
