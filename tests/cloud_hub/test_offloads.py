"""The offload answerer: the cloud model's time goes to offloads that can still be answered."""

from __future__ import annotations

import time

import numpy as np

from cloud_hub.cloud_model import CloudModel
from cloud_hub.metrics import HubMetrics
from cloud_hub.offloads import OffloadAnswerer, PendingOffload
from fleet.contract import protocol as p
from fleet.inference.model import Model
from models import CLOUD_BUNDLE, STREAMS_FILE


def test_offloads_past_their_deadline_are_dropped_before_the_model_runs() -> None:
    sent: list[tuple[str, p.Answer]] = []
    metrics = HubMetrics()
    answerer = OffloadAnswerer(CloudModel(Model.open(CLOUD_BUNDLE, "onnxruntime")), metrics,
                               lambda d, a: sent.append((d, a)), batch_max=8, batch_wait_ms=0,
                               queue_size=8)
    x = np.load(STREAMS_FILE)["clean_x"][:3]
    now = time.time()
    batch = [PendingOffload("d1", p.Offload("late", "m", x[0], 50.0, now, 0, 0.5), now - 0.2),
             PendingOffload("d1", p.Offload("fresh", "m", x[1], 50.0, now, 0, 0.5), now),
             PendingOffload("d2", p.Offload("long", "m", x[2], 5000.0, now, 0, 0.5), now - 1)]
    answerer.answer_batch(batch)
    assert sorted(a.id for _, a in sent) == ["fresh", "long"]
    assert all(a.error is None for _, a in sent)
    assert metrics.registry.get_sample_value("ehi_hub_offloads_answered_total",
                                             {"outcome": "expired"}) == 1
    sent.clear()
    answerer.answer_batch(batch[:1])  # nothing left to run
    assert sent == []
