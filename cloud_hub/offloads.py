"""Answering offloads: a dynamic batcher in front of the cloud model, a worker thread, and the
inline fast path.

The network thread hands each decoded offload to `submit`. With nothing queued and a model that
answers one input in under `inline_max_ms`, it answers at once on that thread: every hand-off to
another thread costs more than such a model (a woken thread runs cold). Otherwise the offload
waits in a bounded queue for the worker, which takes whatever is queued (up to `batch_max`,
waiting up to `batch_wait_ms`) and runs it as one batch. A full queue answers "hub busy".
An offload whose deadline passed while it waited is dropped before the model runs (counted,
`ehi_hub_offloads_answered_total{outcome="expired"}`): its device has answered at the edge
already, and under overload the model's time goes to offloads still answerable in time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloud_hub.cloud_model import CloudModel
from cloud_hub.metrics import HubMetrics
from fleet.contract import protocol as p
from fleet.inference.batcher import DynamicBatcher

log = logging.getLogger(__name__)

# Weight of the newest batch-1 inference time in its moving average (the inline fast path).
INFER_EWMA_WEIGHT = 0.1

# Publishes an answer to a device: (device, answer).
AnswerSink = Callable[[str, p.Answer], None]


@dataclass(frozen=True, slots=True)
class PendingOffload:
    device: str
    offload: p.Offload
    received: float


class OffloadAnswerer:
    def __init__(self, model: CloudModel, metrics: HubMetrics, send: AnswerSink, *,
                 batch_max: int, batch_wait_ms: float, queue_size: int,
                 inline_max_ms: float = 0.0) -> None:
        self.model = model
        self.metrics = metrics
        self._send = send
        self.queue: DynamicBatcher[PendingOffload] = DynamicBatcher(
            batch_max, batch_wait_ms / 1e3, queue_size)
        self.inline_max_ms = inline_max_ms
        self._infer_ms_ewma = 0.0
        self._worker_busy = threading.Event()

    def submit(self, device: str, offload: p.Offload) -> None:
        """Answer now (inline), queue for the worker, or answer "hub busy" when full."""
        item = PendingOffload(device, offload, time.time())
        if self._inline():
            self.answer_batch([item])
        elif not self.queue.offer(item):
            self.metrics.offloads.labels("queue_full").inc()
            self._send(device, p.Answer(offload.id, -1, 0.0, self.model.ref,
                                        error="hub busy: offload queue full"))

    def _inline(self) -> bool:
        return (self.inline_max_ms > 0 and len(self.queue) == 0
                and not self._worker_busy.is_set()
                and self._infer_ms_ewma < self.inline_max_ms)

    def step(self) -> None:
        """One batch of the worker (run supervised: cloud_hub/supervisor.py). A batch that
        raises is not answered: its devices answer at the edge by the deadline."""
        batch = self.queue.next_batch()
        if batch:
            self._worker_busy.set()
            try:
                self.answer_batch(batch)
            finally:
                self._worker_busy.clear()

    def answer_batch(self, batch: list[PendingOffload]) -> None:
        now = time.time()
        live = [i for i in batch if now - i.received < i.offload.deadline_ms / 1000.0]
        if len(live) < len(batch):
            self.metrics.offloads.labels("expired").inc(len(batch) - len(live))
            batch = live
            if not batch:
                return
        t0 = time.perf_counter()
        answers = self.model.answer([i.offload.input for i in batch], batched=True)
        dt = time.perf_counter() - t0
        n_ok = sum(a.error is None for a in answers)
        if n_ok:
            self.metrics.batch_size.observe(n_ok)
            self.metrics.infer_seconds.observe(dt)
            if n_ok == 1:
                self._infer_ms_ewma += INFER_EWMA_WEIGHT * (dt * 1e3 - self._infer_ms_ewma)
        for item, a in zip(batch, answers, strict=True):
            if a.error is not None:
                self.metrics.offloads.labels("bad_input").inc()
                self._send(item.device, p.Answer(item.offload.id, -1, 0.0, self.model.ref,
                                                 error=a.error))
                continue
            hub_ms = (time.time() - item.received) * 1000.0
            self._send(item.device, p.Answer(item.offload.id, a.label, a.confidence,
                                             self.model.ref, hub_ms=hub_ms))
            self.metrics.offloads.labels("answered").inc()
