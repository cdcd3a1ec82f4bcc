"""The local API over real HTTP on loopback."""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from edge_agent.local_api import LocalApi
from fleet.transport.mqtt import MemoryBus, MemorySession
from models import EDGE_BUNDLE, STREAMS_FILE


@pytest.fixture
def api() -> Iterator[tuple[str, Agent]]:
    bus = MemoryBus()  # no hub: hard inputs fall back to the edge answer
    settings = AgentSettings(device_id="api-test", bundle=EDGE_BUNDLE, telemetry_interval_s=60,
                             offload={"deadline_ms": 20.0})
    agent = Agent(settings, transport_factory=lambda on_msg, subs, on_conn, _will:
                  MemorySession(bus, on_msg, subs, on_conn))
    agent.start()
    server = LocalApi(agent, "127.0.0.1", 0, max_body_bytes=4096)
    server.start()
    yield f"http://127.0.0.1:{server.port}", agent
    server.stop()
    agent.stop()


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


post_json = functools.partial(_post, headers={"Content-Type": "application/json"})


def test_json_and_raw_inputs_get_answers(api: tuple[str, Agent]) -> None:
    base, agent = api
    data = np.load(STREAMS_FILE)
    x, y = data["clean_x"][:10], data["clean_y"][:10]
    labels = []
    for xi in x:
        code, ans = post_json(base + "/v1/infer", json.dumps({"input": xi.tolist()}).encode())
        assert code == 200 and set(ans) >= {"label", "confidence", "source", "latency_ms"}
        labels.append(ans["label"])
    assert np.mean(np.array(labels) == y) >= 0.8
    code, ans = _post(base + "/v1/infer", x[0].astype(np.float32).tobytes(),
                      {"Content-Type": "application/octet-stream", "X-EHI-Dtype": "float32",
                       "X-EHI-Shape": "8,8", "X-EHI-Input-Ref": "cam/1"})
    assert code == 200 and ans["label"] == labels[0]
    code, many = _post(base + "/v1/infer", x[:4].astype(np.float32).tobytes(),
                       {"Content-Type": "application/octet-stream", "X-EHI-Dtype": "float32",
                        "X-EHI-Shape": "4,8,8"})
    assert code == 200 and [m["label"] for m in many["answers"]] == labels[:4]
    assert agent.counters.snapshot()["inputs"] == 15


@pytest.mark.parametrize("body, headers, code, message", [
    (b'{"input": [[1, 2], [3, 4]]}', {"Content-Type": "application/json"}, 400, "does not match"),
    (b"{nope", {"Content-Type": "application/json"}, 400, "not JSON"),
    (b'{"x": 1}', {"Content-Type": "application/json"}, 400, "input"),
    (b'{"input": [[1, 2], [3]]}', {"Content-Type": "application/json"}, 400, "rectangular"),
    (b"\x00" * 10, {"Content-Type": "application/octet-stream", "X-EHI-Shape": "8,8"}, 400,
     "needs 256 bytes"),
    (b"\x00" * 256, {"Content-Type": "application/octet-stream", "X-EHI-Shape": "8,8",
                     "X-EHI-Dtype": "complex64"}, 400, "dtype"),
    (b"0" * 5000, {"Content-Type": "application/json"}, 413, "exceeds"),
])
def test_bad_requests_get_clear_errors(api: tuple[str, Agent], body: bytes,
                                       headers: dict[str, str], code: int, message: str) -> None:
    base, agent = api
    got, ans = _post(base + "/v1/infer", body, headers)
    assert got == code and message in ans["error"]
    # Every refused input is counted (an oversized body is refused before it is read).
    assert agent.counters.snapshot()["input_errors"] == (1 if code == 400 else 0)
    # The agent keeps serving.
    ok, _ = post_json(base + "/v1/infer", json.dumps({"input": [[0] * 8] * 8}).encode())
    assert ok == 200


def test_health_and_telemetry(api: tuple[str, Agent]) -> None:
    base, _ = api
    with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
        h = json.loads(r.read())
    assert h["status"] == "ok" and h["model"] == "digits-edge@1"
    with urllib.request.urlopen(base + "/v1/telemetry", timeout=5) as r:
        assert "queues" in json.loads(r.read())


def test_metrics_show_the_outbox(api: tuple[str, Agent]) -> None:
    base, agent = api
    agent.infer(np.zeros((8, 8), np.float32))
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE ehi_agent_outbox_entries gauge" in text
    assert 'ehi_agent_outbox_entries{kind="result"} 1' in text
    assert "ehi_agent_outbox_dropped_full_total 0" in text
    assert 'ehi_agent_events_total{event="inputs"} 1' in text
    assert 'ehi_agent_offload{figure="threshold"}' in text
    assert "ehi_agent_offload_drifting 0" in text
    assert f'ehi_agent_fidelity_agreement{{backend="{agent.engine.backend.name}"}}' in text
