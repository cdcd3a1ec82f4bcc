"""The isolation phases of `bench/security.py`, against a real hub process on a confined broker:

- `hostile_messages`: an enrolled device sends hostile messages on every channel the hub reads
  (fleet/lab/hostile_messages.py), each channel paced under its quota, while a second device
  (fleet/lab/victim_device.py) sends valid results, reports and telemetry; the same victim
  alone first, as the baseline of the same run;
- `readyz_truthful`: a worker made to hang (the hub's SQLite database held locked for writes)
  must turn `/readyz` to 503 naming it, and back to 200 after;
- `registry_race`: two different signed bundles with one name@version uploaded at the same
  moment, again and again: the registry must keep exactly one, whole.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import random
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fleet.contract import protocol as p
from fleet.contract.bundle import pack_bundle
from fleet.lab.bundle_copy import copy_bundle
from fleet.lab.hostile_attacker import ATTACK_RATES, CHANNELS
from fleet.lab.hostile_messages import hostile
from fleet.lab.hub_metrics import metric_samples, metric_sum
from fleet.lab.mqtt_probe import Probe
from fleet.lab.victim_device import VictimDevice

VICTIM_RESULTS_EVERY_S = 0.05
# The attacker process sends 20,000 messages in about 45 s.
ATTACK_TIMEOUT_S = 600.0   # a batch of 8 records: 160 records/s
VICTIM_REPORT_EVERY_S = 2.0
DRAIN_S = 90.0


class _Victim(threading.Thread):
    """The victim's traffic until stopped: results, telemetry, and a report every 2 s whose
    storing delay is measured."""

    def __init__(self, victim: VictimDevice, api: httpx.Client) -> None:
        super().__init__(daemon=True)
        self.victim = victim
        self.api = api
        self.stop = threading.Event()
        self.report_delays: list[tuple[float, float | None]] = []
        self._k = 1

    def _stored_target(self) -> str | None:
        r = self.api.get(f"/v1/devices/{self.victim.device}")
        return r.json().get("update_target") if r.status_code == 200 else None

    def run(self) -> None:
        next_telemetry = next_report = time.monotonic()
        while not self.stop.wait(VICTIM_RESULTS_EVERY_S):
            self.victim.send_results(8)
            self.victim.resend_due()
            now = time.monotonic()
            if now >= next_telemetry:
                self.victim.send_telemetry()
                next_telemetry = now + 1.0
            if now >= next_report:
                self._k += 1
                self.report_delays.append((now, self.victim.report_delay_s(
                    self._k, self._stored_target)))
                next_report = time.monotonic() + VICTIM_REPORT_EVERY_S


def generate(n: int, rng: random.Random, path: Path) -> collections.Counter[str]:
    """`n` hostile messages, channels in the proportions of ATTACK_RATES, written to `path`
    (so that the attack itself costs the bench little CPU): per message a channel index, a
    length and the payload."""
    chs = CHANNELS
    weights = [ATTACK_RATES[c] for c in chs]
    mutations: collections.Counter[str] = collections.Counter()
    with path.open("wb") as f:
        for _ in range(n):
            ch = rng.choices(chs, weights)[0]
            _c, payload, how = hostile("attacker", rng, (ch,))
            f.write(struct.pack(">BI", chs.index(ch), len(payload)) + payload)
            mutations[how.split(":")[0]] += 1
    return mutations


def _refused(text: str) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for labels, v in metric_samples(text, "ehi_hub_refused_messages_total"):
        out[labels.get("reason", "?")] += int(v)
    return out


def hostile_messages(broker_port: int, mode: str, pki_root: Path, api: httpx.Client,
                     metrics: httpx.Client, n: int, baseline_s: float,
                     rng: random.Random, work: Path) -> dict[str, Any]:
    victim_probe = Probe("victim", broker_port, mode, pki_root / "devices" / "victim")  # type: ignore[arg-type]
    assert victim_probe.connect(), victim_probe.connect_reason
    victim = VictimDevice(victim_probe, "victim")
    traffic = _Victim(victim, api)
    readyz: collections.Counter[int] = collections.Counter()
    polling = threading.Event()

    def poll_ready() -> None:
        while not polling.wait(0.25):
            try:
                readyz[metrics.get("/readyz").status_code] += 1
            except httpx.HTTPError:
                readyz[0] += 1

    poller = threading.Thread(target=poll_ready, daemon=True)
    stock = work / "hostile.bin"
    mutations = generate(n, rng, stock)
    refused_before = _refused(metrics.get("/metrics").text)
    traffic.start()
    poller.start()
    time.sleep(baseline_s)
    attack_start = time.monotonic()
    # The attacker is a process of its own, as a device is: its publishing does not share the
    # measuring victim's interpreter.
    run = subprocess.run([sys.executable, "-m", "fleet.lab.hostile_attacker", str(broker_port),
                          mode, str(pki_root / "devices" / "attacker"), str(stock)],
                         capture_output=True, text=True, timeout=ATTACK_TIMEOUT_S, check=False)
    attack_end = time.monotonic()
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"the attacker failed: {run.stdout[-300:]} {run.stderr[-500:]}")
    by_channel = json.loads(lines[-1])["by_channel"]
    time.sleep(2.0)  # the last of them reach the hub before the victim stops
    traffic.stop.set()
    traffic.join(60)
    acked = victim.wait_acked(DRAIN_S)
    polling.set()
    poller.join(5)
    stored = api.get("/v1/results/count", params={"device": "victim"}).json()["count"]
    text = metrics.get("/metrics").text
    refused = _refused(text)
    refused.subtract(refused_before)
    refused = +refused  # only the reasons this phase added to
    workers_down = [lb.get("worker") for lb, v in metric_samples(text, "ehi_hub_worker_up")
                    if v == 0]
    worker_errors = metric_sum(text, "ehi_hub_worker_errors_total")
    delays_attack = [d for at, d in traffic.report_delays if at >= attack_start]
    victim_probe.close()
    return {
        "hostile_messages": n, "hostile_seconds": round(attack_end - attack_start, 1),
        "hostile_by_channel": by_channel, "hostile_mutations": dict(mutations),
        "hostile_refused_by_reason": dict(sorted(refused.items())),
        "hub_workers_died": len(workers_down), "hub_worker_errors": int(worker_errors),
        "readyz_during_attack": dict(readyz),
        "victim_results_sent": len(victim.sent_ids),
        "victim_results_acked": len(victim.acked_ids), "victim_results_stored": stored,
        "victim_all_acked": acked,
        "victim_ack_p99_ms_baseline": victim.ack_ms_at(99, until=attack_start),
        "victim_ack_p99_ms": victim.ack_ms_at(99, since=attack_start, until=attack_end),
        "victim_ack_p50_ms_baseline": victim.ack_ms_at(50, until=attack_start),
        "victim_ack_p50_ms": victim.ack_ms_at(50, since=attack_start, until=attack_end),
        "victim_ack_ms_by_10s": [
            victim.ack_ms_at(99, since=t, until=t + 10.0)
            for t in np.arange(attack_start - baseline_s, attack_end, 10.0).tolist()],
        "victim_report_delay_max_s": (None if not delays_attack or None in delays_attack
                                      else round(max(d for d in delays_attack if d), 3)),
        "victim_reports": len(delays_attack),
    }


def readyz_truthful(url: str, database: Path, broker_port: int, mode: str, pki_root: Path,
                    stall_s: float) -> dict[str, Any]:
    """Hold the hub's SQLite database locked for writes while a device reports: the control
    worker's step blocks; /readyz must say 503 and name it, then 200 once the lock goes."""
    probe = Probe("victim", broker_port, mode, pki_root / "devices" / "victim",  # type: ignore[arg-type]
                  client_id="victim-readyz")
    assert probe.connect(), probe.connect_reason
    lock = sqlite3.connect(database, timeout=30, isolation_level=None)
    seen_503: dict[str, Any] | None = None
    with httpx.Client(base_url=url, timeout=30) as c:
        before = c.get("/readyz").status_code
        lock.execute("BEGIN IMMEDIATE")  # a write lock: readers go on (WAL), writers wait
        try:
            probe.client.publish(p.topic("victim", p.Channel.STATUS),
                                 p.status_payload("online", "victim"), qos=1, retain=True)
            end = time.monotonic() + stall_s + 20
            while time.monotonic() < end and seen_503 is None:
                r = c.get("/readyz")
                if r.status_code == 503:
                    seen_503 = r.json()
                time.sleep(0.2)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        end = time.monotonic() + 30
        after = 503
        while time.monotonic() < end and after != 200:
            after = c.get("/readyz").status_code
            time.sleep(0.2)
    probe.close()
    named = isinstance(seen_503, dict) and isinstance(seen_503.get("workers"), dict)
    return {"readyz_before": before, "readyz_while_hung": seen_503, "readyz_after": after,
            "readyz_truthful": before == 200 and named and after == 200}


def _mark_golden(year: int, bundle: Path) -> None:
    """Make two bundles of one version differ in a file, not only in their manifests."""
    g = bundle / "golden.npz"
    g.write_bytes(g.read_bytes() + str(year).encode())


def registry_race(api: httpx.Client, work: Path, key: Path, edge_bundle: Path,
                  trials: int) -> dict[str, Any]:
    """Upload two different signed bundles of one name@version at once (their golden files
    differ), `trials` times; count the versions where a file the registry serves is not the
    one its registered manifest lists (length and sha256)."""
    mismatches = 0
    outcomes: collections.Counter[str] = collections.Counter()
    for t in range(trials):
        v = 100 + t
        bodies = []
        for year in (2030, 2031):
            b = copy_bundle(edge_bundle, work / f"race-{v}-{year}", version=v, key=key,
                            changes={"name": "race",
                                     "expires": f"{year}-01-01T00:00:00+00:00"},
                            edit_files=functools.partial(_mark_golden, year))
            bodies.append(pack_bundle(b))
        barrier = threading.Barrier(len(bodies))
        codes: list[int] = []

        def up(body: bytes, barrier: threading.Barrier = barrier,
               codes: list[int] = codes) -> None:
            with httpx.Client(base_url=str(api.base_url), headers=api.headers,
                              timeout=60) as c:
                barrier.wait()
                codes.append(c.post("/v1/models", content=body).status_code)

        threads = [threading.Thread(target=up, args=(b,)) for b in bodies]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        outcomes[",".join(str(c) for c in sorted(codes))] += 1
        registered = api.get(f"/v1/models/race/{v}")
        if registered.status_code != 200:
            mismatches += 1
            continue
        for f in registered.json()["manifest"]["files"]:
            served = api.get(f"/v1/models/race/{v}/files/{f['path']}")
            if served.status_code != 200 or len(served.content) != f["length"] or \
                    hashlib.sha256(served.content).hexdigest() != f["sha256"]:
                mismatches += 1
                break
    return {"registry_race_trials": trials, "registry_race_mismatches": mismatches,
            "registry_race_outcomes": dict(outcomes)}
