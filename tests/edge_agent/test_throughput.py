"""Throughput mode: batch mode through the local API, and parallel OpenVINO requests."""

from __future__ import annotations

import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from edge_agent.errors import AgentBusy
from edge_agent.local_api import LocalApi
from fleet.contract.bundle import load_bundle
from fleet.inference.backends import BackendOptions, open_backend
from fleet.inference.preprocess import Preprocessor
from fleet.transport.mqtt import MemoryBus, MemorySession
from models import EDGE_BUNDLE, STREAMS_FILE


def _agent(**throughput: object) -> Agent:
    bus = MemoryBus()
    a = Agent(AgentSettings(device_id="tp", bundle=EDGE_BUNDLE, telemetry_interval_s=60,
                            backend="onnxruntime",
                            offload={"deadline_ms": 20.0}, throughput=throughput),
              transport_factory=lambda m, s, c, _w: MemorySession(bus, m, s, c))
    a.start()
    return a


def test_batch_mode_gathers_concurrent_requests() -> None:
    a = _agent(mode="batch", max_batch=8, max_wait_ms=50.0)
    calls = 0
    run = a.engine.backend.run

    def counting(batch: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        return run(batch)

    a.engine.backend.run = counting  # type: ignore[method-assign]
    api = LocalApi(a, "127.0.0.1", 0, 1 << 20)
    api.start()
    data = np.load(STREAMS_FILE)
    x, y = data["clean_x"][:16], data["clean_y"][:16]

    def post(i: int) -> int:
        body = json.dumps({"input": x[i].tolist()}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{api.port}/v1/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(json.loads(r.read())["label"])

    try:
        with ThreadPoolExecutor(16) as pool:
            labels = list(pool.map(post, range(16)))
    finally:
        api.stop()
        a.stop()
    assert np.mean(np.array(labels) == y) >= 0.8
    assert calls < 16, "concurrent requests were gathered into batches"
    assert a.outbox.produced == 16


def test_batch_mode_refuses_bad_input_and_full_queue() -> None:
    a = _agent(mode="batch", max_batch=4, max_wait_ms=1.0, max_queue=1)
    try:
        from fleet.contract.errors import ProtocolError

        with pytest.raises(ProtocolError, match="does not match"):
            a.submit(np.zeros((3, 3), np.float32))
        assert a.submit(np.zeros((8, 8), np.float32)).source in ("edge", "edge_fallback")
        # Stop the batcher and fill its queue: the next request is refused, not queued forever.
        a._stop.set()
        a._threads[-1].join(timeout=2)
        assert a._batcher is not None and a._batcher.offer(object())  # type: ignore[arg-type]
        with pytest.raises(AgentBusy):
            a.submit(np.zeros((8, 8), np.float32))
    finally:
        a.stop()


def test_openvino_pool_serves_concurrent_requests_correctly() -> None:
    b = load_bundle(EDGE_BUNDLE)
    be = open_backend("openvino", b.model_path, BackendOptions(openvino_hint="THROUGHPUT"))
    assert be.parallel_requests >= 1  # type: ignore[attr-defined]
    pre = Preprocessor.for_manifest(b.manifest)
    x = pre(np.load(STREAMS_FILE)["mixed_x"][:64])
    expected = be.run(x).argmax(1)
    errors: list[Exception] = []

    def worker(k: int) -> None:
        try:
            for i in range(k, 64, 4):
                assert int(be.run(x[i:i + 1]).argmax()) == int(expected[i])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
