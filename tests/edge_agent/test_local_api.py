"""The local API over real HTTP on loopback."""

from __future__ import annotations

import functools
import json
import socket
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
    # Deadlines that would hold an offload slot for ever, or make no sense.
    (b'{"input": [[0]], "deadline_ms": Infinity}', {"Content-Type": "application/json"}, 400,
     "finite"),
    (b'{"input": [[0]], "deadline_ms": NaN}', {"Content-Type": "application/json"}, 400,
     "finite"),
    (b'{"input": [[0]], "deadline_ms": [1]}', {"Content-Type": "application/json"}, 400,
     "a number"),
    (b'{"input": [[0]], "input_ref": {"a": 1}}', {"Content-Type": "application/json"}, 400,
     "input_ref"),
    (b"\x00" * 256, {"Content-Type": "application/octet-stream", "X-EHI-Shape": "8,8",
                     "X-EHI-Deadline-Ms": "inf"}, 400, "finite"),
    (b"\x00" * 256, {"Content-Type": "application/octet-stream", "X-EHI-Shape": "8,8",
                     "X-EHI-Deadline-Ms": "soon"}, 400, "a number"),
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


@pytest.mark.parametrize("deadline", [0, -5, 1e12])
def test_deadlines_out_of_range_are_refused_before_any_work(api: tuple[str, Agent],
                                                            deadline: float) -> None:
    base, agent = api
    code, ans = post_json(base + "/v1/infer", json.dumps(
        {"input": [[0] * 8] * 8, "deadline_ms": deadline}).encode())
    assert code == 400 and "deadline_ms must be a number in (0, 60000]" in ans["error"]
    snap = agent.counters.snapshot()
    assert (snap["input_errors"], snap["inputs"]) == (1, 0)


def test_connections_are_capped_and_idle_ones_closed() -> None:
    bus = MemoryBus()
    settings = AgentSettings(device_id="api-cap", bundle=EDGE_BUNDLE, telemetry_interval_s=60)
    agent = Agent(settings, transport_factory=lambda on_msg, subs, on_conn, _will:
                  MemorySession(bus, on_msg, subs, on_conn))
    agent.start()
    server = LocalApi(agent, "127.0.0.1", 0, 4096, max_connections=4, idle_timeout_s=1.0)
    server.start()
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
    try:
        # Four silent clients take every slot: the fifth is told so at once, not queued.
        # (the server accepts in order: the four before the fifth)
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"too many connections" in reply
        assert agent.counters.snapshot()["connections_refused"] >= 1
        extra.close()
        # Idle past the timeout, the held connections are closed by the agent ...
        for s in held:
            assert s.recv(1) == b""
        # ... and their slots serve again.
        body = json.dumps({"input": [[0] * 8] * 8}).encode()
        code, _ = post_json(f"http://127.0.0.1:{server.port}/v1/infer", body)
        assert code == 200
    finally:
        for s in held:
            s.close()
        server.stop()
        agent.stop()


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
