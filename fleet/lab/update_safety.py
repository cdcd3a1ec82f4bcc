"""Model updates under attack and under crashes: a real broker, hub and agent as processes.

(a) The attack set, each delivered the way an attacker could: through the hub's registry and
    API (a tampered artifact store, a bundle for other hardware), or straight onto the device's
    `desired` topic by someone holding broker access, and even the hub's own signing key (bad
    bundle signature, unknown key, unsigned, older version, expired, replayed or forged
    assignment). Each must be refused with the model on disk unchanged.
(b) `kill -9` of the agent at random moments of an update (download, verify, health check,
    activation), then a restart that must come up on a complete old or new model.
(c) A bundle that fails its health check: the time until the agent reports it and stays on
    the old model.
(d) A hot swap while the local API serves a fixed request rate: every request must succeed.

`bench/update_safety.py` runs it in full; the test suite runs a smaller one.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import write_settings
from fleet.contract import protocol as p
from fleet.contract.assignment import Assignment, encode_desired
from fleet.contract.bundle import MANIFEST_NAME, load_bundle, pack_bundle
from fleet.contract.errors import FleetError
from fleet.contract.signing import (
    SIGNATURES_KEY,
    PrivateKey,
    PublicKey,
    generate_keys,
    verify_bundle,
)
from fleet.lab.brokers import RunningBroker, start_broker
from fleet.lab.bundle_copy import break_golden, copy_bundle
from fleet.lab.processes import ManagedProcess, ProcessGroup, start_hub, work_folder
from fleet.transport.mqtt import MqttConfig, MqttSession
from fleet.transport.ports import free_port
from models import DEMO_PUBLIC_KEY, EDGE_BUNDLE, STREAMS_FILE

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
# An update of the small digits bundle takes about a second; a report arrives well within this.
UPDATE_TIMEOUT_S = 60.0
POLL_S = 0.05
HTTP_TIMEOUT_S = 10.0
DEVICE = "safety-0"


@dataclass(frozen=True)
class SafetyOptions:
    crash_trials: int = 50
    swap_rate_hz: float = 200.0
    swap_seconds: float = 6.0
    # The agent's download bandwidth cap (bytes/s); None: the digits bundle's size per second,
    # so that an update's download takes about a second and random kills land inside the
    # download as well as after it (the bundle grew from 36 to 97 kB with its fidelity set).
    download_rate: float | None = None
    backend: str = "onnxruntime"
    seed: int = 0
    workdir: Path | None = None
    keep: bool = False


@dataclass
class AttackOutcome:
    name: str
    delivered_by: str
    expected: str
    reported_state: str | None = None
    reported_code: str | None = None
    disk_unchanged: bool = False
    model_unchanged: bool = False

    @property
    def rejected(self) -> bool:
        return (self.reported_state in ("refused", "failed") and self.disk_unchanged
                and self.model_unchanged)


@dataclass
class CrashTrial:
    delay_s: float
    phase: str           # the update state persisted when the process died
    before: str
    target: str
    on_disk: str | None  # what `current` held after the kill (None: the factory bundle)
    disk_complete: bool
    came_up_on: str | None
    finished: bool       # the update completed after the restart

    @property
    def safe(self) -> bool:
        return (self.disk_complete and self.came_up_on in (self.before, self.target)
                and self.finished)


@dataclass
class SafetyReport:
    attacks: list[AttackOutcome] = field(default_factory=list)
    crashes: list[CrashTrial] = field(default_factory=list)
    update_seconds: float = 0.0
    revert_seconds: float | None = None
    revert_reported: str | None = None
    swap: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        phases: dict[str, int] = {}
        for c in self.crashes:
            phases[c.phase] = phases.get(c.phase, 0) + 1
        return {
            "attacks_total": len(self.attacks),
            "attacks_rejected": sum(a.rejected for a in self.attacks),
            "crash_trials": len(self.crashes),
            "crash_safe": sum(c.safe for c in self.crashes),
            "revert_seconds": self.revert_seconds,
            "swap_failed_requests": self.swap.get("failed"),
            "update_seconds": round(self.update_seconds, 3),
            "crash_phases": phases,
            "attacks": [{"name": a.name, "delivered_by": a.delivered_by, "expected": a.expected,
                         "state": a.reported_state, "code": a.reported_code,
                         "disk_unchanged": a.disk_unchanged,
                         "model_unchanged": a.model_unchanged, "rejected": a.rejected}
                        for a in self.attacks],
            "crashes": [{"delay_s": round(c.delay_s, 3), "phase": c.phase, "before": c.before,
                         "target": c.target, "on_disk": c.on_disk,
                         "disk_complete": c.disk_complete, "came_up_on": c.came_up_on,
                         "finished": c.finished, "safe": c.safe} for c in self.crashes],
            "revert_reported": self.revert_reported,
            "swap": self.swap,
        }


def _http(method: str, url: str, body: bytes | None = None,
          ctype: str = "application/json") -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": ctype} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


class _Rig:
    """Broker, hub and one updating agent as processes; the operator's and attacker's tools."""

    def __init__(self, o: SafetyOptions, group: ProcessGroup, workdir: Path) -> None:
        self.o = o
        self.group = group
        self.workdir = workdir
        self.download_rate = (o.download_rate if o.download_rate is not None else float(
            load_bundle(EDGE_BUNDLE, verify_files=False).manifest.total_bytes))
        self.fleet_key = workdir / "keys" / "fleet.key"
        self.fleet_pub = generate_keys(self.fleet_key, workdir / "keys" / "fleet.pub")
        self.attacker_key = workdir / "keys" / "attacker.key"
        generate_keys(self.attacker_key, workdir / "keys" / "attacker.pub")
        self.hub_key_path = workdir / "hub.key"
        self.hub_key = PrivateKey.read_or_generate(self.hub_key_path)
        self.broker: RunningBroker = start_broker(group, workdir, "mosquitto")
        self.hub_port = free_port()
        self.hub_url = f"http://127.0.0.1:{self.hub_port}"
        self.hub = self._start_hub()
        self.agent_port = free_port()
        self.models_dir = workdir / "agent-models"
        self.agent: ManagedProcess = self.start_agent()
        self.version = 1
        self.captured: list[bytes] = []
        self.mqtt = MqttSession(MqttConfig(port=self.broker.port, client_id="safety-operator"),
                                lambda t, b: self.captured.append(b),
                                [(p.topic(DEVICE, p.Channel.DESIRED), 1)])
        self.mqtt.start()
        if not self.mqtt.wait_connected(START_TIMEOUT_S):
            raise FleetError("the bench's MQTT client did not connect")

    # ------------------------------------------------------------------ processes

    def _start_hub(self) -> ManagedProcess:
        return start_hub(self.group, self.workdir, port=self.hub_port,
                         broker_port=self.broker.port, log_path=self.workdir / "hub.log",
                         env={"EHI_HUB_TRUSTED_KEYS": json.dumps([self.fleet_pub.to_text()])})

    def start_agent(self) -> ManagedProcess:
        cfg = self.workdir / "agent.toml"
        if not cfg.exists():
            write_settings(cfg, {
                "device_id": DEVICE, "bundle": EDGE_BUNDLE, "backend": self.o.backend,
                "telemetry_interval_s": 5.0, "mqtt": {"port": self.broker.port},
                "local_api": {"port": self.agent_port},
                "results": {"outbox_dir": self.workdir / "outbox"},
                "update": {"enabled": True, "hub_url": self.hub_url,
                           "trusted_keys": [self.fleet_pub.to_text()],
                           "hub_keys": [self.hub_key.public.to_text()],
                           "models_dir": self.models_dir, "download_rate": self.download_rate}})
        n = sum(1 for x in self.group.procs if x.name == "agent")
        a = self.group.start("agent", [sys.executable, "-m", "edge_agent.cli", "run",
                                       "--config", str(cfg)], self.workdir / f"agent-{n}.log")
        self.agent = a
        return a

    def wait_agent_up(self) -> str:
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            m = self.agent_model()
            if m is not None:
                return m
            if self.agent.proc.poll() is not None:
                break
            time.sleep(POLL_S)
        raise FleetError(f"the agent did not come up:\n{self.agent.tail()}")

    def kill_agent(self) -> None:
        self.agent.kill()
        self.agent.proc.wait(timeout=10)

    # ------------------------------------------------------------------ looking

    def agent_model(self) -> str | None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.agent_port, timeout=2)
            try:
                conn.request("GET", "/healthz")
                r = conn.getresponse()
                return str(json.loads(r.read())["model"]) if r.status == 200 else None
            finally:
                conn.close()
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            return None

    def device(self) -> dict[str, Any]:
        code, body = _http("GET", f"{self.hub_url}/v1/devices/{DEVICE}")
        return body if code == 200 and isinstance(body, dict) else {}

    def wait_report(self, pred: Callable[[dict[str, Any]], bool],
                    timeout: float = UPDATE_TIMEOUT_S) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            d = self.device()
            if d and pred(d):
                return d
            time.sleep(POLL_S)
        return None

    def disk(self) -> tuple[str | None, dict[str, str]]:
        """What `current` points to and the sha256 of each file there: the model on disk."""
        import hashlib

        link = self.models_dir / "current"
        if not link.is_symlink():
            return None, {}
        target = Path(link.readlink())
        files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                 for f in sorted(target.iterdir()) if f.is_file()} if target.is_dir() else {}
        return str(target), files

    def disk_model(self) -> tuple[str | None, bool]:
        """(name@version on disk or None for the factory bundle, whether it is complete)."""
        link = self.models_dir / "current"
        if not link.is_symlink():
            return None, True
        try:
            b = Path(link.readlink())
            verify_bundle(b, [self.fleet_pub, PublicKey.read(DEMO_PUBLIC_KEY)])
            return load_bundle(b).manifest.ref, True
        except Exception as exc:  # anything wrong on disk is a failed trial, with its reason
            log.error("model on disk is not complete: %s", exc)
            return None, False

    def persisted_state(self, with_target: bool = False) -> Any:
        try:
            d = json.loads((self.models_dir / "state.json").read_text())
            st, tgt = str(d["state"]), d.get("target")
        except (OSError, ValueError, KeyError):
            st, tgt = "none", None
        return (st, tgt) if with_target else st

    # ------------------------------------------------------------------ acting

    def bundle(self, version: int, key: Path | None = None, name: str = "",
               changes: dict[str, Any] | None = None,
               edit: Callable[[Path], None] | None = None) -> Path:
        return copy_bundle(EDGE_BUNDLE, self.workdir / "bundles" / f"v{version}{name}",
                           version=version, key=key, changes=changes, edit_files=edit)

    def next_version(self) -> int:
        self.version += 1
        return self.version

    def push(self, bundle: Path) -> None:
        code, body = _http("POST", f"{self.hub_url}/v1/models", pack_bundle(bundle),
                           "application/gzip")
        if code != 201:
            raise FleetError(f"the hub refused {bundle.name}: {code} {body}")

    def assign(self, version: int) -> dict[str, Any]:
        code, body = _http("PUT", f"{self.hub_url}/v1/devices/{DEVICE}/desired",
                           json.dumps({"model": "digits-edge", "version": version}).encode())
        if code != 200:
            raise FleetError(f"the hub refused the assignment of version {version}: {body}")
        return dict(body)

    def hub_seq(self) -> int:
        code, body = _http("GET", f"{self.hub_url}/v1/devices/{DEVICE}/desired")
        return int(body["seq"]) if code == 200 else 0

    def publish_desired(self, payload: bytes) -> None:
        if not self.mqtt.publish(p.topic(DEVICE, p.Channel.DESIRED), payload, qos=1,
                                 retain=True):
            raise FleetError("could not publish on the desired topic")

    def forge(self, bundle: Path, key: PrivateKey | None = None,
              manifest: dict[str, Any] | None = None) -> bytes:
        """An assignment as a compromised hub would sign it (the hub's key unless `key`)."""
        m = manifest or json.loads((bundle / MANIFEST_NAME).read_text())
        return encode_desired(Assignment(DEVICE, self.hub_seq() + 1, time.time(), m),
                              key or self.hub_key)

    def stop(self) -> None:
        self.mqtt.stop()


# ---------------------------------------------------------------------------- the scenario


def _reported_since(t0: float) -> Callable[[dict[str, Any]], bool]:
    def pred(d: dict[str, Any]) -> bool:
        return ((d.get("reported_at") or 0) >= t0
                and d.get("update_state") in ("refused", "failed", "idle"))
    return pred


def _installed(ref: str) -> Callable[[dict[str, Any]], bool]:
    def pred(d: dict[str, Any]) -> bool:
        return d.get("model") == ref and d.get("update_state") == "idle"
    return pred


def _update_to(rig: _Rig, version: int) -> float:
    t0 = time.monotonic()
    rig.assign(version)
    want = f"digits-edge@{version}"
    if rig.wait_report(_installed(want)) is None:
        raise FleetError(f"the agent did not install {want}: {rig.device()}\n{rig.agent.tail()}")
    return time.monotonic() - t0


def _attacks(rig: _Rig, report: SafetyReport) -> None:
    past = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0).isoformat()
    running = rig.version
    old_payload = rig.captured[0]  # the first assignment the hub published, long superseded

    def via_desired(bundle: Path, **kw: Any) -> Callable[[], None]:
        return lambda: rig.publish_desired(rig.forge(bundle, **kw))

    def tampered_store(edit: Callable[[Path], None]) -> Callable[[], None]:
        def go() -> None:
            v = rig.next_version()
            rig.push(rig.bundle(v, rig.fleet_key))
            stored = rig.workdir / "artifacts" / "digits-edge" / str(v) / "model.onnx"
            edit(stored)
            rig.assign(v)
        return go

    def flip_byte(f: Path) -> None:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))

    def append(f: Path) -> None:
        f.write_bytes(f.read_bytes() + b"\0" * 4096)

    def bad_signature() -> None:
        b = rig.bundle(rig.next_version(), rig.fleet_key, "-badsig")
        m = json.loads((b / MANIFEST_NAME).read_text())
        sig = m[SIGNATURES_KEY][0]["sig"]
        m[SIGNATURES_KEY][0]["sig"] = ("A" if sig[0] != "A" else "B") + sig[1:]
        rig.publish_desired(rig.forge(b, manifest=m))

    def hardware() -> None:
        v = rig.next_version()
        rig.push(rig.bundle(v, rig.fleet_key, "-riscv", {"hardware": ["riscv64"]}))
        rig.assign(v)

    attacks: list[tuple[str, str, str, Callable[[], None]]] = [
        ("bad signature", "desired topic", "bad_signature", bad_signature),
        ("unknown key", "desired topic", "unknown_key",
         via_desired(rig.bundle(rig.version + 1, rig.attacker_key, "-attacker"))),
        ("unsigned bundle", "desired topic", "unsigned",
         via_desired(rig.bundle(rig.version + 1, None, "-unsigned"))),
        ("older version", "desired topic", "version",
         via_desired(rig.workdir / "bundles" / f"v{running - 1}")),
        ("expired manifest", "desired topic", "expired",
         via_desired(rig.bundle(rig.version + 1, rig.fleet_key, "-expired",
                                {"expires": past}))),
        ("hash mismatch", "hub artifact store", "hash", tampered_store(flip_byte)),
        ("file longer than stated", "hub artifact store", "size", tampered_store(append)),
        ("incompatible hardware", "hub registry and API", "hardware", hardware),
        ("replayed old assignment", "desired topic", "replay",
         lambda: rig.publish_desired(old_payload)),
        ("assignment not signed by the hub", "desired topic", "assignment_signature",
         via_desired(rig.bundle(rig.version + 1, rig.fleet_key, "-forged"),
                     key=PrivateKey.read(rig.attacker_key))),
    ]
    for name, by, expected, deliver in attacks:
        model_before, disk_before = rig.agent_model(), rig.disk()
        t0 = time.time()
        deliver()
        d = rig.wait_report(_reported_since(t0), UPDATE_TIMEOUT_S)
        time.sleep(0.2)  # anything the agent would still do after its report, it does now
        out = AttackOutcome(name, by, expected)
        if d is not None:
            out.reported_state, out.reported_code = d.get("update_state"), d.get("update_code")
        out.disk_unchanged = rig.disk() == disk_before
        out.model_unchanged = rig.agent_model() == model_before
        log.info("attack %s: %s %s, disk unchanged %s", name, out.reported_state,
                 out.reported_code, out.disk_unchanged)
        report.attacks.append(out)


# Every other trial kills at a random moment of the whole update; the rest kill as soon as the
# persisted state reaches a given step (plus a random moment within it), so that the short
# steps (verify, health check, activation) are hit too, not only the long download.
AIMED_PHASES = ("downloading", "verifying", "checking", "activating")
STATE_POLL_S = 0.0005


def _kill_when(rig: _Rig, target: str, phase: str, extra_s: float, give_up_s: float) -> None:
    order = ("downloading", "verifying", "checking", "activating", "idle")
    end = time.monotonic() + give_up_s
    while time.monotonic() < end:
        st, tgt = rig.persisted_state(with_target=True)
        if tgt == target and st in order and order.index(st) >= order.index(phase):
            break
        time.sleep(STATE_POLL_S)
    time.sleep(extra_s)
    rig.kill_agent()


def _crash_trials(rig: _Rig, report: SafetyReport, rng: random.Random) -> None:
    window = max(report.update_seconds * 1.2, 0.5)
    for i in range(rig.o.crash_trials):
        before = rig.agent_model() or "?"
        v = rig.next_version()
        rig.push(rig.bundle(v, rig.fleet_key))
        target = f"digits-edge@{v}"
        aimed = AIMED_PHASES[(i // 2) % len(AIMED_PHASES)] if i % 2 else None
        rig.assign(v)
        t0 = time.monotonic()
        if aimed is None:
            time.sleep(rng.uniform(0.0, window))
            rig.kill_agent()
        else:
            _kill_when(rig, target, aimed, rng.uniform(0.0, 0.002), UPDATE_TIMEOUT_S)
        delay = time.monotonic() - t0
        phase = rig.persisted_state()
        on_disk, complete = rig.disk_model()
        rig.start_agent()
        came_up = rig.wait_agent_up()
        finished = rig.wait_report(_installed(target)) is not None
        trial = CrashTrial(delay, phase, before, target, on_disk, complete, came_up, finished)
        log.info("crash trial %d: killed after %.2f s in %s; came up on %s; safe %s", i, delay,
                 phase, came_up, trial.safe)
        report.crashes.append(trial)


def _revert(rig: _Rig, report: SafetyReport) -> None:
    before = rig.agent_model()
    v = rig.next_version()
    rig.push(rig.bundle(v, rig.fleet_key, "-unhealthy", edit=break_golden))
    t0 = time.monotonic()
    rig.assign(v)
    d = rig.wait_report(lambda d: d.get("update_state") in ("failed", "reverted")
                        and d.get("update_target") == f"digits-edge@{v}")
    if d is not None and rig.agent_model() == before:
        report.revert_seconds = round(time.monotonic() - t0, 3)
        report.revert_reported = f"{d.get('update_state')} ({d.get('update_code')}): " \
                                 f"{d.get('update_error')}"


def _hot_swap(rig: _Rig, report: SafetyReport) -> None:
    o = rig.o
    x = np.load(STREAMS_FILE)["clean_x"][:64].astype(np.float32)
    stop = threading.Event()
    lock = threading.Lock()
    stats: dict[str, Any] = {"sent": 0, "ok": 0, "failed": 0, "errors": [], "models": {}}
    threads_n = 8
    per_thread = o.swap_rate_hz / threads_n

    def client(k: int) -> None:
        conn: http.client.HTTPConnection | None = None
        t0 = time.monotonic()
        n = 0
        while not stop.is_set():
            due = t0 + n / per_thread
            if (wait := due - time.monotonic()) > 0:
                stop.wait(wait)
                if stop.is_set():
                    break
            xi = x[(k + n * threads_n) % len(x)]
            n += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", rig.agent_port,
                                                      timeout=HTTP_TIMEOUT_S)
                conn.request("POST", "/v1/infer", xi.tobytes(), {
                    "Content-Type": "application/octet-stream", "X-EHI-Dtype": "float32",
                    "X-EHI-Shape": "8,8"})
                r = conn.getresponse()
                body = r.read()
                ok = r.status == 200
                model = json.loads(body).get("model") if ok else None
                err = None if ok else f"{r.status}: {body[:120]!r}"
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                ok, model, err = False, None, repr(exc)
            with lock:
                stats["sent"] += 1
                if ok:
                    stats["ok"] += 1
                    stats["models"][model] = stats["models"].get(model, 0) + 1
                else:
                    stats["failed"] += 1
                    if len(stats["errors"]) < 5:
                        stats["errors"].append(err)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(threads_n)]
    v = rig.next_version()
    rig.push(rig.bundle(v, rig.fleet_key))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(o.swap_seconds / 3)
    swap_t = _update_to(rig, v)
    time.sleep(max(0.0, o.swap_seconds - (time.monotonic() - t0)))
    stop.set()
    for t in threads:
        t.join(timeout=HTTP_TIMEOUT_S + 1)
    elapsed = time.monotonic() - t0
    stats["seconds"] = round(elapsed, 2)
    stats["rate_hz"] = round(stats["sent"] / elapsed, 1)
    stats["update_seconds"] = round(swap_t, 3)
    report.swap = stats


def run_safety(o: SafetyOptions, progress: Callable[[str], None] | None = None) -> SafetyReport:
    say = progress or (lambda s: None)
    report = SafetyReport()
    rng = random.Random(o.seed)
    with work_folder(o.workdir, "ehi-update-safety-", o.keep) as workdir, ProcessGroup() as group:
        rig = _Rig(o, group, workdir)
        try:
            if rig.wait_agent_up() != "digits-edge@1":
                raise FleetError("the agent did not start on the factory bundle")
            say("legitimate updates")
            times = []
            for _ in range(3):
                v = rig.next_version()
                rig.push(rig.bundle(v, rig.fleet_key))
                times.append(_update_to(rig, v))
            report.update_seconds = statistics.median(times)
            say("attacks")
            _attacks(rig, report)
            say(f"{o.crash_trials} crash trials")
            _crash_trials(rig, report, rng)
            say("health-check failure")
            _revert(rig, report)
            say(f"hot swap at {o.swap_rate_hz:g} requests/s")
            _hot_swap(rig, report)
        finally:
            rig.stop()
    return report
