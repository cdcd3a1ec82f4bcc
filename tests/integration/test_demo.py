"""`fleet demo` end to end, with a small sample count, on both brokers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet.cli.app import app
from fleet.lab.brokers import mosquitto_path
from tests.conftest import need

KEYS = {"samples", "edge_accuracy", "cloud_accuracy", "hybrid_accuracy", "offload_rate",
        "bytes_offloaded", "bytes_cloud_only", "latency_ms", "results_produced",
        "results_at_hub", "broker"}


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_demo_json(broker: str, tmp_path: Path) -> None:
    if broker == "mosquitto":
        need(mosquitto_path() is not None, "mosquitto is not installed")
    out = tmp_path / "demo.json"
    result = CliRunner().invoke(app, ["demo", "--devices", "2", "--samples", "120", "--broker",
                                      broker, "--rate", "200", "--json", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert set(r) >= KEYS
    assert r["broker"] == broker and r["samples"] == 120
    assert r["results_at_hub"] == r["results_produced"] == 120
    assert set(r["latency_ms"]) == {"local_p50", "local_p99", "offload_p50", "offload_p99"}
    assert 0 < r["offload_rate"] < 0.6
    assert 0 < r["bytes_offloaded"] < r["bytes_cloud_only"]
    w = r["wire_bytes"]
    assert set(w) >= {"total", "per_input", "cloud_only_per_input"}
    if sys.platform == "linux":  # the kernel's TCP_INFO counts every byte of each link
        assert w["total"] == w["sent"] + w["received"]
        # Every offload's payload crossed a device's link, with its framing and the rest.
        assert w["sent"] > r["bytes_offloaded"]
        assert w["per_input"] == round(w["total"] / 120, 1)
    for k in ("edge_accuracy", "cloud_accuracy", "hybrid_accuracy"):
        assert 0.5 < r[k] <= 1.0
    # The hybrid is at least as good as the edge alone on the same inputs.
    assert r["hybrid_accuracy"] >= r["edge_accuracy"]
    assert "hybrid accuracy" in result.output
    # The model update pushed mid-stream: every answer names the model that gave it.
    u = r["update"]
    assert u["to"] == "digits-edge@2" and u["devices_updated"] <= u["devices_assigned"] <= 2
    assert sum(u["results_by_model"].values()) == 120
    assert set(u["results_by_model"]) <= {"digits-edge@1", "digits-edge@2"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mtls", "password"])
def test_demo_secure(mode: str, tmp_path: Path) -> None:
    """The same loop on a confined broker over TLS, the API with roles: nothing lost."""
    need(mosquitto_path() is not None, "mosquitto is not installed")
    out = tmp_path / "demo.json"
    result = CliRunner().invoke(app, ["demo", "--devices", "2", "--samples", "120", "--rate",
                                      "200", "--secure", mode, "--json", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["broker"] == f"mosquitto, confined ({mode}, TLS)"
    assert r["results_at_hub"] == r["results_produced"] == 120
    assert r["hybrid_accuracy"] >= r["edge_accuracy"] and r["offload_rate"] > 0
    # The update was uploaded with the operator's token (a refused upload fails the demo).
    assert r["update"]["to"] == "digits-edge@2"


def test_demo_refuses_bad_options() -> None:
    r = CliRunner().invoke(app, ["demo", "--stream", "nope", "--samples", "10"])
    assert r.exit_code == 1 and "unknown stream" in r.output
    r = CliRunner().invoke(app, ["demo", "--devices", "5", "--samples", "3"])
    assert r.exit_code == 1 and "fewer than" in r.output
    r = CliRunner().invoke(app, ["demo", "--secure", "plaintext", "--samples", "10"])
    assert r.exit_code == 1 and "choose mtls or password" in r.output
