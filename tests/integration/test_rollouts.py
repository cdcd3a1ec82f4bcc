"""Rollouts end to end: the `fleet` CLI (Typer's runner) against a real hub with its bridge on
Mosquitto, and a simulated fleet; then the scenario of bench/rollout.py, smaller."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from fleet.cli.app import EXIT_HALTED, EXIT_REFUSED, EXIT_UNREACHABLE, app
from fleet.contract.bundle import pack_bundle
from fleet.inference.engine import Engine
from fleet.lab.brokers import RunningBroker, mosquitto_path, start_broker
from fleet.lab.processes import ProcessGroup
from fleet.lab.rollout_scenario import RolloutOptions, run_rollouts
from fleet.lab.sim_fleet import SimFleet
from fleet.transport.ports import free_port
from models import CLOUD_BUNDLE, STREAMS_FILE
from tests.conftest import need, wait_until
from tests.updates import HubServer, UpdateKit, hub_settings

CONNECT_S = 10.0
# Every device of a rolled-back rollout back on its previous model: seconds when idle; a loaded
# 2-core machine (the CI under load) took over 20.
REVERT_S = 120.0


@pytest.fixture(scope="module")
def stream() -> tuple[np.ndarray, np.ndarray]:
    with np.load(STREAMS_FILE) as z:
        x = z["mixed_x"][:200].astype(np.float32)
    e = Engine.open(CLOUD_BUNDLE, "onnxruntime")
    try:
        return x, e.predict_batch(x).argmax(axis=1)
    finally:
        e.close()


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[RunningBroker]:
    """A broker of this test's own: the session's broker holds retained status messages of
    earlier tests' devices, which the hub would register too."""
    need(mosquitto_path() is not None, "mosquitto is not installed")
    with ProcessGroup() as group:
        yield start_broker(group, tmp_path, "mosquitto")


@pytest.fixture
def fleet_hub(own_mosquitto: RunningBroker, kit: UpdateKit, tmp_path: Path,
              stream: tuple[np.ndarray, np.ndarray]) -> Iterator[tuple[HubServer, SimFleet]]:
    mosquitto = own_mosquitto
    s = hub_settings(tmp_path / "hub", kit, mqtt={"port": mosquitto.port, "shared": False},
                     replica_id=f"hub-{tmp_path.name}", rollout_tick_s=0.1)
    with HubServer(s, with_bridge=True) as hub:
        assert hub.app.state.bridge.transport.wait_connected(CONNECT_S)
        for v in (1, 3):
            assert hub.push(kit.version(v)).status_code == 201
        sim = SimFleet(broker_port=mosquitto.port, hub_url=hub.url,
                       hub_keys=[kit.hub_key.public], trusted=[kit.pub], factory=kit.version(1),
                       stream_x=stream[0], cloud_labels=stream[1], workdir=tmp_path / "sim",
                       devices=12, rate_hz=10.0, prefix=f"cli{tmp_path.name[-4:]}",
                       labels=lambda i: {"site": "berlin" if i < 8 else "lyon"})
        sim.start()
        try:
            yield hub, sim
        finally:
            sim.stop()


def fleet(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args), env=env)
    return r.exit_code, r.output


@pytest.mark.mosquitto
def test_devices_models_and_rollouts_through_the_cli(fleet_hub: tuple[HubServer, SimFleet],
                                                      kit: UpdateKit) -> None:
    hub, sim = fleet_hub
    h = ("--hub", hub.url)
    # Every device known with the labels its telemetry reports (the hub stores telemetry every
    # half second, after the device's status).
    assert wait_until(lambda: sum(1 for d in json.loads(fleet("devices", "list", "--json", *h)[1])
                                  if d.get("labels", {}).get("site")) == 12, CONNECT_S)
    first = sorted(sim.devices)[0]
    code, out = fleet("devices", "label", first, "hw=rpi4", *h)
    assert code == 0 and "hw=rpi4" in out and "site=berlin" in out
    code, out = fleet("devices", "list", "-l", "hw=rpi4", "--json", *h)
    assert code == 0 and [d["id"] for d in json.loads(out)] == [first]
    code, out = fleet("devices", "list", *h)
    assert code == 0 and "12 devices" in out
    code, out = fleet("models", "list", *h)
    assert code == 0 and "digits-edge" in out
    code, out = fleet("models", "show", "digits-edge", "3", *h)
    assert code == 0 and "golden.npz" in out

    # Version 2 from its folder (pushed by the CLI), to Berlin, with the directives signed.
    code, out = fleet("rollout", "start", str(kit.version(2)), "--to", "site=berlin",
                      "--stages", "25,100", "--bake", "0", "--min-results", "20",
                      "--key", str(kit.key), *h)
    assert code == 0, out
    assert "signed rollback directives digits-edge@2 -> 1" in out
    code, out = fleet("rollout", "status", "--watch", "--json", *h)
    assert code == 0, out
    r = json.loads(out)
    assert r["state"] == "completed" and r["stage_counts"][-1]["cumulative"] == 8
    code, out = fleet("rollout", "status", str(r["id"]), *h)
    assert code == 0 and "completed" in out and "stage 2" in out and "offload_rate" in out
    assert sim.models() == {"digits-edge@2": 8, "digits-edge@1": 4}

    # Overlaps are refused, with what to do.
    code, out = fleet("rollout", "start", "digits-edge@3", "--to", "site=berlin",
                      "--bake", "1h", "--key", str(kit.key), "--json", *h)
    assert code == 0, out
    rid = json.loads(out)["id"]
    code, out = fleet("rollout", "start", "digits-edge@3", *h)
    assert code == EXIT_REFUSED and "already targets" in out
    # Pause, resume, roll back; a paused rollout cannot be paused again.
    assert fleet("rollout", "pause", str(rid), *h) == (0, f"rollout {rid}: paused\n")
    code, out = fleet("rollout", "pause", str(rid), *h)
    assert code == EXIT_REFUSED and "cannot pause" in out
    assert fleet("rollout", "resume", str(rid), *h)[0] == 0
    assert fleet("rollout", "rollback", str(rid), *h)[0] == 0
    code, out = fleet("rollout", "status", str(rid), "--watch", *h)
    assert code == EXIT_HALTED
    assert wait_until(lambda: sim.models().get("digits-edge@3", 0) == 0, REVERT_S)
    code, out = fleet("rollout", "list", *h)
    assert code == 0 and "rolled_back" in out and "completed" in out
    code, out = fleet("rollout", "status", str(rid), "--devices", *h)
    assert code == 0 and "digits-edge@2" in out and "revert" in out  # previous, reverting/ed
    code, out = fleet("rollout", "status", str(rid), "--devices", "--json", *h)
    rows = json.loads(out)["devices"]
    assert rows and all(d["previous_model"] == "digits-edge@2" for d in rows)
    metrics = httpx.get(f"{hub.url}/metrics", timeout=10).text
    for line in ('ehi_hub_rollout_actions_total{action="pause",outcome="done"} 1.0',
                 'ehi_hub_rollout_actions_total{action="pause",outcome="refused"} 1.0',
                 'ehi_hub_rollouts{state="completed"} 1.0', "ehi_hub_rollout_leader 1.0",
                 'ehi_hub_rollout_stages_total{decision="passed",gate=""} 2.0'):
        assert line in metrics, line


def test_cli_errors_say_what_to_do(kit: UpdateKit, tmp_path: Path) -> None:
    code, out = fleet("rollout", "status", "--hub", f"http://127.0.0.1:{free_port()}")
    assert code == EXIT_UNREACHABLE and "is the hub running" in out
    with HubServer(hub_settings(tmp_path, kit, api_token="s3cret")) as hub:
        code, out = fleet("rollout", "status", "--hub", hub.url)
        assert code == EXIT_REFUSED and "no rollouts yet" in out
        code, out = fleet("models", "push", str(kit.version(2)), "--hub", hub.url)
        assert code == EXIT_REFUSED and "401" in out and "EHI_FLEET_TOKEN" in out
        code, out = fleet("models", "push", str(kit.version(2)), "--hub", hub.url,
                          env={"EHI_FLEET_TOKEN": "s3cret"})
        assert code == 0, out
        code, out = fleet("rollout", "start", "digits-edge@2", "--stages", "5,x", "--hub",
                          hub.url, env={"EHI_FLEET_TOKEN": "s3cret"})
        assert code == EXIT_REFUSED and "neither a percentage" in out
        code, out = fleet("rollout", "start", "nope", "--hub", hub.url)
        assert code == EXIT_REFUSED and "NAME@VERSION" in out
        assert pack_bundle(kit.version(2))  # the bundle is intact


@pytest.mark.slow
@pytest.mark.mosquitto
def test_rollout_scenario_small(tmp_path: Path) -> None:
    need(mosquitto_path() is not None, "mosquitto is not installed")
    r = run_rollouts(RolloutOptions(devices=30, stages=("#3", "#10", "100%"), rate_hz=15.0,
                                    min_results=400, warmup_s=3.0, workdir=tmp_path))
    assert r["good_completed"] and r["good_seconds"] <= 60, r["good"]
    assert r["bad_halted_at_stage"] == 1 and r["bad_devices_outside_first_stage_updated"] == 0
    assert r["ml_gate_halted"], r["ml"]
    assert r["ml_gate_devices_reverted"] == r["ml_gate_devices_in_stage"] == 3
