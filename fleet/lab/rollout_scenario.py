"""Three rollouts to a simulated fleet through a real broker and hub.

(a) a good bundle (version 2) rolls out in three stages to completion;
(b) a bundle that fails its health check on the devices (version 3) must halt at stage 1, its
    devices sent back, nobody outside stage 1 touched;
(c) a bundle that installs fine but offloads twice as much (version 4: the same model with a
    lower threshold and twice the offload budget) must be halted by the ML gate and its
    stage's devices reverted.

`bench/rollout.py` runs it with 200 devices; the test suite with fewer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fleet.cli.hub_client import HubClient, HubClientError
from fleet.contract.assignment import rollback_directive
from fleet.contract.bundle import load_bundle, pack_bundle
from fleet.contract.errors import FleetError
from fleet.contract.signing import PrivateKey, PublicKey, generate_keys
from fleet.inference.engine import Engine
from fleet.lab.brokers import start_broker
from fleet.lab.bundle_copy import break_golden, copy_bundle
from fleet.lab.hub_metrics import scrape
from fleet.lab.processes import ProcessGroup, start_hub, wait_until, work_folder
from fleet.lab.sim_fleet import SimFleet
from fleet.transport.ports import free_port
from models import CLOUD_BUNDLE, EDGE_BUNDLE, STREAMS_FILE

log = logging.getLogger(__name__)

POLL_S = 0.2
READY_TIMEOUT_S = 60.0
TERMINAL = ("completed", "halted", "rolled_back")


@dataclass(frozen=True)
class RolloutOptions:
    devices: int = 200
    rate_hz: float = 4.0          # results per second per device
    min_results: int = 400        # per stage, before the ML gate judges
    bake_s: float = 0.0
    stages: tuple[str, ...] = ("5%", "25%", "100%")
    warmup_s: float = 4.0         # results on the old version before the first rollout
    timeout_s: float = 180.0      # per rollout
    tick_s: float = 0.2           # the hub's rollout controller
    seed: int = 0
    workdir: Path | None = None
    keep: bool = False


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    found: list[Any] = [None]

    def check() -> Any:
        found[0] = pred()
        return found[0]

    if wait_until(check, timeout, POLL_S):
        return found[0]
    raise FleetError(f"timed out waiting for {what}")


def _worse_threshold(bundle: Path, x: np.ndarray, factor: float) -> tuple[float, float, float]:
    """A threshold under which the bundle offloads `factor` times as much on this stream."""
    e = Engine.open(bundle, "onnxruntime")
    try:
        scores = e.policy.scores(e.predict_batch(x))
        rate = float((scores > e.policy.threshold).mean())
        t = float(np.quantile(scores, 1.0 - min(0.95, rate * factor)))
        return t, rate, float((scores > t).mean())
    finally:
        e.close()


class _Run:
    def __init__(self, o: RolloutOptions, hub: HubClient, sim: SimFleet) -> None:
        self.o, self.hub, self.sim = o, hub, sim

    def start(self, version: int) -> dict[str, Any]:
        o = self.o
        return dict(self.hub.post("/v1/rollouts", json={
            "model": "digits-edge", "version": version, "selector": "", "stages": list(o.stages),
            "bake_s": o.bake_s, "min_results": o.min_results, "max_failure": 0.05,
            "max_offload_increase": 0.2, "stage_timeout_s": o.timeout_s}))

    def until_done(self, rid: int) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            r = self.hub.get(f"/v1/rollouts/{rid}", devices=True)
            return r if r["state"] in TERMINAL else None
        return dict(_wait(done, self.o.timeout_s, f"rollout {rid} to end"))

    def until_reverted(self, rid: int) -> dict[str, Any]:
        def settled() -> dict[str, Any] | None:
            r = self.hub.get(f"/v1/rollouts/{rid}", devices=True)
            return None if any(d["state"] == "reverting" for d in r["devices"]) else r
        return dict(_wait(settled, self.o.timeout_s, f"rollout {rid}'s devices to go back"))

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in self.hub.get("/v1/devices")}


def run_rollouts(o: RolloutOptions, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = say or (lambda m: None)
    with work_folder(o.workdir, "ehi-rollout-", o.keep) as workdir, ProcessGroup() as group:
        return _scenario(o, group, workdir, say)


def _scenario(o: RolloutOptions, group: ProcessGroup, workdir: Path,
              say: Callable[[str], None]) -> dict[str, Any]:
    key = workdir / "keys" / "fleet.key"
    pub = generate_keys(key, workdir / "keys" / "fleet.pub")
    broker = start_broker(group, workdir, "mosquitto")
    port = free_port()
    start_hub(group, workdir, port=port, broker_port=broker.port, log_path=workdir / "hub.log",
              env={"EHI_HUB_TRUSTED_KEYS": json.dumps([pub.to_text()]),
                   "EHI_HUB_ROLLOUT_TICK_S": str(o.tick_s)})
    hub = HubClient(f"http://127.0.0.1:{port}")
    _wait(lambda: _ready(hub), READY_TIMEOUT_S, "the hub")
    with np.load(STREAMS_FILE) as z:
        x = z["mixed_x"].astype(np.float32)
    say("bundles")
    b = workdir / "bundles"
    v1 = copy_bundle(EDGE_BUNDLE, b / "v1", version=1, key=key)
    v2 = copy_bundle(EDGE_BUNDLE, b / "v2", version=2, key=key)
    v3 = copy_bundle(EDGE_BUNDLE, b / "v3-unhealthy", version=3, key=key, edit_files=break_golden)
    t, rate, worse_rate = _worse_threshold(v2, x, 2.0)
    m = load_bundle(v2).manifest
    he = m.to_dict()["hard_example"]
    # Devices calibrate their threshold for the bundle's offload budget
    # (fleet/inference/fidelity.py): a release that offloads twice as much states twice the
    # budget, as well as the threshold.
    fid = m.to_dict()["fidelity"]
    v4 = copy_bundle(EDGE_BUNDLE, b / "v4-offloads-more", version=4, key=key, changes={
        "hard_example": {**he, "threshold": t, "thresholds": {**he["thresholds"],
                                                             he["policy"]: t}},
        "fidelity": {**fid, "offload_budget": round(min(0.9, fid["offload_budget"] * 2.0), 4)}})
    for bundle in (v1, v2, v3, v4):
        hub.post("/v1/models", content=pack_bundle(bundle))
    soon = datetime.now(UTC) + timedelta(days=1)
    for frm, to in ((2, 1), (3, 2), (4, 2)):
        hub.post("/v1/models/digits-edge/rollbacks",
                 json=rollback_directive("digits-edge", frm, to, soon, PrivateKey.read(key)))
    cloud = Engine.open(CLOUD_BUNDLE, "onnxruntime")
    try:
        cloud_labels = cloud.predict_batch(x).argmax(axis=1)
    finally:
        cloud.close()
    hub_pub = PublicKey.read(workdir / "hub.pub")
    say(f"{o.devices} simulated devices")
    sim = SimFleet(broker_port=broker.port, hub_url=hub.url, hub_keys=[hub_pub], trusted=[pub],
                   factory=v1, stream_x=x, cloud_labels=cloud_labels, workdir=workdir / "sim",
                   devices=o.devices, rate_hz=o.rate_hz, seed=o.seed,
                   labels=lambda i: {"site": ("berlin", "lyon", "porto")[i % 3],
                                     "hw": "rpi4" if i % 2 else "x86"})
    sim.start()
    run = _Run(o, hub, sim)
    out: dict[str, Any] = {"devices": o.devices, "offload_rate_v2": round(rate, 4),
                           "offload_rate_v4": round(worse_rate, 4)}
    try:
        _wait(lambda: sum(d["model"] == "digits-edge@1" for d in run.devices().values())
              == o.devices, READY_TIMEOUT_S, "every device to register")
        time.sleep(o.warmup_s)

        say("(a) good bundle")
        t0 = time.monotonic()
        r = run.until_done(run.start(2)["id"])
        out["good_seconds"] = round(time.monotonic() - t0, 2)
        on_v2 = sum(d["model"] == "digits-edge@2" for d in run.devices().values())
        out["good_completed"] = r["state"] == "completed" and on_v2 == o.devices
        out["good"] = _summary(r)
        time.sleep(o.warmup_s)  # the devices' figures on version 2: the next baseline

        say("(b) bundle failing its health check")
        r = run.until_reverted(run.until_done(run.start(3)["id"])["id"])
        devices = run.devices()
        stage1 = {d["device"] for d in r["devices"] if d["stage"] == 1}
        out["bad_halted_at_stage"] = r["stage"] if r["state"] == "halted" else None
        out["bad_devices_outside_first_stage_updated"] = sum(
            1 for name, d in devices.items() if name not in stage1
            and (d["model"] != "digits-edge@2" or d["update_target"] == "digits-edge@3"))
        out["bad"] = _summary(r)

        say("(c) bundle that offloads twice as much")
        r = run.until_reverted(run.until_done(run.start(4)["id"])["id"])
        devices = run.devices()
        in_stage = [d for d in r["devices"] if d["stage"] == 1 and d["state"] != "skipped"]
        out["ml_gate_halted"] = (r["state"] == "halted" and r["stage"] == 1
                                 and "offload_rate" in (r["reason"] or ""))
        out["ml_gate_devices_in_stage"] = len(in_stage)
        out["ml_gate_devices_reverted"] = sum(
            1 for d in in_stage if d["state"] == "reverted"
            and devices[d["device"]]["model"] == "digits-edge@2")
        out["ml"] = _summary(r)
        out["results_sent"] = sim.results_sent
        out["hub_messages_dropped"] = int(scrape(
            f"http://127.0.0.1:{port}", 'ehi_hub_bad_messages_total{reason="queue_full"'))
    finally:
        sim.stop()
        hub.close()
    return out


def _ready(hub: HubClient) -> bool:
    try:
        return bool(hub.get("/readyz").get("ready"))
    except HubClientError:
        return False


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "state": r["state"], "stage": r["stage"], "reason": r["reason"],
            "stage_counts": r["stage_counts"], "gates": r["gates"]}
