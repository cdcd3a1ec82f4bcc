"""The ingest worker: stores what devices send in bulk (results, hard examples), then
acknowledges it to each device.

It takes every message waiting (up to BULK_MESSAGES) and stores the results in one
transaction (cloud_hub/ingest.py); the hard examples among them are answered late by the cloud
model in one call and stored in one transaction of their own (one per message cost a device's
neighbours a commit each). A message that does not decode is refused (counted, logged) and the
others go on; a transaction that fails is split until only the messages the database refuses
alone are left (cloud_hub/isolation.py), and those are acknowledged as rejected, so that their
device stops sending them. Only when the database itself does not answer does the worker back
off.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.orm import sessionmaker

from cloud_hub.cloud_model import CloudModel
from cloud_hub.ingest import LateAnswer, ingest_hard_examples_many, ingest_results
from cloud_hub.isolation import OutageBackoff, database_answers, store_apart
from cloud_hub.metrics import HubMetrics
from cloud_hub.refusals import Refusals
from fleet.contract import protocol as p
from fleet.contract.errors import ProtocolError
from fleet.inference.batcher import DynamicBatcher

log = logging.getLogger(__name__)

# Results messages stored in one transaction at most, and how long they may gather after the
# first (fewer, larger transactions; results are not waited on).
BULK_MESSAGES = 256
BULK_WAIT_S = 0.05


@dataclass(frozen=True, slots=True)
class Incoming:
    device: str
    channel: p.Channel
    payload: bytes


@dataclass(frozen=True, slots=True)
class HardMessage:
    """A hard-examples message with its cloud answers, and {id: reason} for the others."""

    item: Incoming
    answers: list[LateAnswer]
    bad: dict[str, str]


@dataclass(frozen=True, slots=True)
class DecodedResults:
    """A results message decoded: its valid records, and {id: reason} for the others."""

    item: Incoming
    good: list[p.ResultRecord]
    bad: dict[str, str]


SendAck = Callable[[str, p.Ack], None]
T = TypeVar("T")


def decode_refusing(item: Incoming, decode: Callable[[bytes], T],
                    refusals: Refusals) -> T | None:
    """`decode(payload)`, or None with the message refused: whatever the decoder raises."""
    try:
        return decode(item.payload)
    except ProtocolError as exc:
        refusals.refuse(item.device, item.channel.value, exc.reason, exc, item.payload)
    except Exception as exc:
        log.exception("decoding a %s message of %s failed unexpectedly", item.channel.value,
                      item.device)
        refusals.refuse(item.device, item.channel.value, "internal", exc, item.payload)
    return None


class IngestWorker:
    def __init__(self, sessions: sessionmaker, model: CloudModel, metrics: HubMetrics,
                 refusals: Refusals, send_ack: SendAck, replica: str, queue_size: int) -> None:
        self.sessions = sessions
        self.model = model
        self.metrics = metrics
        self.refusals = refusals
        self.send_ack = send_ack
        self.replica = replica
        self.queue: DynamicBatcher[Incoming] = DynamicBatcher(BULK_MESSAGES, BULK_WAIT_S,
                                                              queue_size)
        self.outage = OutageBackoff(metrics)

    def answers(self) -> bool:
        return database_answers(self.sessions)

    def step(self) -> float | None:
        """One batch of messages; raises Backoff while the database does not answer."""
        batch = self.queue.next_batch()
        if not batch:
            return None
        ok = self.store_results([i for i in batch if i.channel is p.Channel.RESULTS])
        hard = [i for i in batch if i.channel is p.Channel.HARD]
        if hard:
            ok = self.store_hard(hard) and ok
        self.metrics.queue_depth.labels("ingest").set(len(self.queue))
        self.outage.settle(ok)
        return None

    # ------------------------------------------------------------------ results

    def store_results(self, items: list[Incoming]) -> bool:
        """Store the results of several messages in one transaction (or apart, see the module
        docstring), then acknowledge each message's ids; False while the database is down."""
        decoded: list[DecodedResults] = []
        for item in items:
            out = decode_refusing(item, p.ResultBatch.decode_lenient, self.refusals)
            if out is None:
                continue
            good, bad = out
            for r in good:
                if r.device != item.device:
                    bad[r.id] = (f"record names device {r.device!r} but came from "
                                 f"{item.device!r}")
            decoded.append(DecodedResults(item, [r for r in good if r.id not in bad], bad))
        return store_apart(decoded, self._store_results, self._refuse_results, self.answers)

    def _store_results(self, decoded: Sequence[DecodedResults]) -> None:
        """One transaction for the decoded messages, then an ack to each."""
        outcome = ingest_results(self.sessions, [r for d in decoded for r in d.good],
                                 self.replica)
        self.metrics.results_inserted.inc(len(outcome.inserted))
        self.metrics.results_duplicate.inc(len(outcome.duplicates))
        for d in decoded:
            if d.bad:
                self.metrics.results_rejected.inc(len(d.bad))
                if self.refusals.may_log(d.item.device, "results", "record"):
                    log.warning("refused %d invalid records from %s, e.g. %s (logged at most "
                                "once a minute per device)", len(d.bad), d.item.device,
                                next(iter(d.bad.items())))
            self.send_ack(d.item.device, p.Ack(list(dict.fromkeys(r.id for r in d.good)),
                                               d.bad))

    def _refuse_results(self, d: DecodedResults, exc: Exception) -> None:
        """A message the database refuses alone: every record of it rejected, by id, so that
        its device stops sending them."""
        why = f"the hub's database refused it: {type(exc).__name__}"
        self.refusals.refuse(d.item.device, d.item.channel.value, "store", exc, d.item.payload)
        self.metrics.results_rejected.inc(len(d.good) + len(d.bad))
        rejected = {**d.bad, **{r.id: why for r in d.good}}
        self.send_ack(d.item.device, p.Ack([], rejected))

    # ------------------------------------------------------------------ hard examples

    def store_hard(self, items: list[Incoming]) -> bool:
        """Answer the hard examples of several messages with the cloud model (one call), store
        them with their answers (one transaction, or apart as for results), then ack each
        message; False while the database is down."""
        decoded: list[tuple[Incoming, list[p.HardExample], dict[str, str]]] = []
        for item in items:
            out = decode_refusing(item, p.HardExample.decode_batch, self.refusals)
            if out is not None:
                decoded.append((item, *out))
        examples = [ex for _, good, _ in decoded for ex in good]
        try:
            cloud = self.model.answer([ex.input for ex in examples])
        except Exception:  # a runtime's error costs these messages, not the worker
            log.exception("the cloud model failed on %d hard examples", len(examples))
            for item, _, _ in decoded:
                self.refusals.refuse(item.device, item.channel.value, "internal",
                                     "the cloud model failed on them", item.payload)
            return True
        answered = iter(zip(examples, cloud, strict=True))
        messages: list[HardMessage] = []
        for item, good, bad in decoded:
            answers: list[LateAnswer] = []
            for ex, a in itertools.islice(answered, len(good)):
                if a.error is not None:
                    bad[ex.id] = a.error
                else:
                    answers.append(LateAnswer(ex, a.label, a.confidence, self.model.ref))
            messages.append(HardMessage(item, answers, bad))
        return store_apart(messages, self._store_hard, self._refuse_hard, self.answers)

    def _store_hard(self, messages: Sequence[HardMessage]) -> None:
        outcomes = ingest_hard_examples_many(self.sessions,
                                             [(m.item.device, m.answers) for m in messages])
        for m, outcome in zip(messages, outcomes, strict=True):
            self.metrics.hard_examples.labels("stored").inc(len(outcome.inserted))
            self.metrics.hard_examples.labels("duplicate").inc(len(outcome.duplicates))
            if m.bad:
                self.metrics.hard_examples.labels("rejected").inc(len(m.bad))
                if self.refusals.may_log(m.item.device, "hard", "record"):
                    log.warning("refused %d hard examples from %s, e.g. %s (logged at most "
                                "once a minute per device)", len(m.bad), m.item.device,
                                next(iter(m.bad.items())))
            self.send_ack(m.item.device, p.Ack(outcome.committed, m.bad, of="hard"))

    def _refuse_hard(self, m: HardMessage, exc: Exception) -> None:
        why = f"the hub's database refused it: {type(exc).__name__}"
        self.refusals.refuse(m.item.device, m.item.channel.value, "store", exc, m.item.payload)
        self.metrics.hard_examples.labels("rejected").inc(len(m.answers) + len(m.bad))
        self.send_ack(m.item.device, p.Ack([], {**m.bad, **{a.example.id: why
                                                           for a in m.answers}}, of="hard"))
