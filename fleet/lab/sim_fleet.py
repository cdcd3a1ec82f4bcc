"""Many simulated devices in one process, speaking the real protocol with the agent's own code.

Each device has an id, labels, the bundle it runs, and the agent's update rules and trust state.
All of them share one MQTT connection (a device's topics are only a naming convention), or, with
`mqtt_for`, each has its own connection with its own identity: a confined broker lets a device
publish only on its own topics. Through it they send what agents send: status, telemetry with their
labels, retained reports, and batches of result records encoded by
`fleet.contract.protocol`; they take desired-model assignments decoded and checked by
`fleet.contract.assignment` and `edge_agent.update_rules`, exactly as an agent does.

What is shared rather than repeated per device: each bundle version is downloaded from the hub
once (the real download, held to the manifest), verified, opened with onnxruntime and
health-checked once (the real check), and run once over the stream's inputs. A device that
installs that version then answers from those outputs: its offload decisions are the bundle's
own (its policy and threshold), so a bundle whose threshold offloads twice as much really does,
and one that fails its health check fails on every device. Latency is the model's measured time
plus a simulated network time for offloaded inputs.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.download import fetch_file, file_url
from edge_agent.errors import AgentError, UpdateError, UpdateRefused
from edge_agent.update_rules import DeviceProfile, TrustState, check_assignment
from fleet.contract import protocol as p
from fleet.contract.assignment import Reported, UpdateState, decode_desired
from fleet.contract.bundle import MANIFEST_NAME, Bundle, Manifest, load_bundle
from fleet.contract.errors import BundleError, ProtocolError
from fleet.contract.signing import PublicKey, SignatureError, verify_bundle
from fleet.inference.engine import Engine
from fleet.inference.errors import HealthCheckFailed, InferenceError
from fleet.inference.health import check_health
from fleet.transport.mqtt import MqttConfig, MqttSession

log = logging.getLogger(__name__)

# Simulated round trip of an offloaded input to the cloud, milliseconds (log-normal).
OFFLOAD_MS_MEDIAN = 2.5
OFFLOAD_MS_SIGMA = 0.35
# A device takes this long (uniform) between receiving an assignment and reporting the result.
INSTALL_S = (0.05, 0.4)
RESULTS_EVERY_S = 0.5
TELEMETRY_EVERY_S = 10.0


@dataclass
class Behaviour:
    """How one bundle version behaves on this stream (computed once, shared by all devices)."""

    manifest: Manifest
    healthy: bool
    error: str | None = None
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hard: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    edge_ms: float = 0.05
    policy: str = ""

    @property
    def offload_rate(self) -> float:
        return float(self.hard.mean()) if self.hard.size else 0.0


@dataclass
class SimDevice:
    id: str
    labels: dict[str, str]
    running: Manifest
    trust: TrustState = field(default_factory=TrustState)
    seq: int = 0
    state: UpdateState = UpdateState.IDLE
    target: str | None = None
    error: str | None = None
    code: str | None = None
    rng: random.Random = field(default_factory=random.Random)


class SimFleet:
    def __init__(self, *, broker_port: int, hub_url: str, hub_keys: list[PublicKey],
                 trusted: list[PublicKey], factory: Path, stream_x: np.ndarray,
                 cloud_labels: np.ndarray, workdir: Path, devices: int,
                 labels: Callable[[int], dict[str, str]] | None = None, prefix: str = "sim",
                 rate_hz: float = 3.0, seed: int = 0, protocol: str = "5",
                 mqtt_for: Callable[[str], MqttConfig] | None = None) -> None:
        self.hub_url = hub_url
        self.hub_keys = hub_keys
        self.trusted = trusted
        self.x = stream_x
        self.cloud = cloud_labels
        self.workdir = workdir
        self.rate_hz = rate_hz
        self._rng = np.random.default_rng(seed)
        self._behaviours: dict[str, Behaviour] = {}
        self._lock = threading.Lock()
        factory_b = load_bundle(factory)
        self._behaviours[factory_b.manifest.ref] = self._behave(factory_b)
        label_of = labels or (lambda i: {})
        self.devices = {f"{prefix}-{i:04d}": SimDevice(
            f"{prefix}-{i:04d}", label_of(i), factory_b.manifest, rng=random.Random(seed + i))
            for i in range(devices)}
        self._inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._timers: list[tuple[float, str, str]] = []  # (due, device, ref) installs
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.results_sent = 0
        # One shared session, or one per device (its own identity).
        self._sessions: dict[str, MqttSession] = {}
        if mqtt_for is None:
            shared = MqttSession(
                MqttConfig(port=broker_port, protocol=protocol,  # type: ignore[arg-type]
                           client_id=f"{prefix}-fleet-{uuid.uuid4().hex[:6]}"),
                self._on_message, [(f"{p.TOPIC_ROOT}/+/{p.Channel.DESIRED.value}", 1)])
            self._sessions = dict.fromkeys(self.devices, shared)
        else:
            self._sessions = {d: MqttSession(mqtt_for(d), self._on_message,
                                             [(p.topic(d, p.Channel.DESIRED), 1)])
                              for d in self.devices}

    # ------------------------------------------------------------------ lifecycle

    def start(self, connect_timeout_s: float = 10.0) -> None:
        sessions = list({id(s): s for s in self._sessions.values()}.values())
        for s in sessions:
            s.start()
        end = time.monotonic() + connect_timeout_s
        for s in sessions:
            if not s.wait_connected(max(0.1, end - time.monotonic())):
                raise AgentError("the simulated fleet could not reach the broker")
        for d in self.devices.values():
            self._publish(d, p.Channel.STATUS, p.status_payload("online", d.id), retain=True)
            self._telemetry(d)
            self._report(d)
        for name, fn in (("sim-updates", self._update_loop), ("sim-results", self._results_loop)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        for s in {id(s): s for s in self._sessions.values()}.values():
            s.stop()

    def models(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.devices.values():
            out[d.running.ref] = out.get(d.running.ref, 0) + 1
        return out

    # ------------------------------------------------------------------ messages

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            device, channel = p.parse_topic(topic)
        except ProtocolError:
            return
        if channel is p.Channel.DESIRED and device in self.devices:
            self._inbox.put((device, payload))

    def _publish(self, d: SimDevice, channel: p.Channel, payload: bytes,
                 retain: bool = False) -> None:
        self._sessions[d.id].publish(p.topic(d.id, channel), payload, qos=p.QOS[channel],
                                     retain=retain)

    def _report(self, d: SimDevice) -> None:
        self._publish(d, p.Channel.REPORTED, Reported(d.id, d.running.ref, d.state, d.target,
                                                      d.error, d.code, d.seq).encode(),
                      retain=True)

    def _telemetry(self, d: SimDevice) -> None:
        self._publish(d, p.Channel.TELEMETRY, p.encode_json(p.Kind.TELEMETRY, {
            "device": d.id, "ts": time.time(), "model": d.running.ref, "backend": "onnxruntime",
            "labels": d.labels, "simulated": True}))

    # ------------------------------------------------------------------ updates

    def _update_loop(self) -> None:
        last_telemetry = time.monotonic()
        while not self._stop.is_set():
            try:
                device, payload = self._inbox.get(timeout=0.05)
                self._handle(self.devices[device], payload)
            except queue.Empty:
                pass
            except Exception:
                log.exception("simulated update failed")
            now = time.monotonic()
            due = [t for t in self._timers if t[0] <= now]
            self._timers = [t for t in self._timers if t[0] > now]
            for _, name, ref in due:
                self._finish_install(self.devices[name], ref)
            if now - last_telemetry > TELEMETRY_EVERY_S:
                last_telemetry = now
                for d in self.devices.values():
                    self._telemetry(d)

    def _handle(self, d: SimDevice, payload: bytes) -> None:
        try:
            a = decode_desired(payload, self.hub_keys)
        except (SignatureError, ProtocolError) as exc:
            d.state, d.code, d.error = UpdateState.REFUSED, "assignment_signature", str(exc)
            self._report(d)
            return
        if a.seq == d.seq and d.state is not UpdateState.DOWNLOADING:
            self._report(d)  # delivered again: already handled
            return
        profile = DeviceProfile(d.id, ("x86_64",), ("onnxruntime",), 512 << 20)
        try:
            m = check_assignment(a, running=d.running, profile=profile, trusted=self.trusted,
                                 trust=d.trust)
        except UpdateRefused as exc:
            d.seq, d.target = a.seq, a.ref
            d.state, d.code, d.error = UpdateState.REFUSED, exc.code, str(exc)
            self._report(d)
            return
        d.seq, d.trust.max_seq = a.seq, max(d.trust.max_seq, a.seq)
        if m is None:
            d.state, d.target, d.code, d.error = UpdateState.IDLE, a.ref, None, None
            self._report(d)
            return
        d.state, d.target, d.code, d.error = UpdateState.DOWNLOADING, m.ref, None, None
        self._report(d)
        self._behaviour(m)  # fetched and checked once per version, here
        self._timers.append((time.monotonic() + d.rng.uniform(*INSTALL_S), d.id, m.ref))

    def _finish_install(self, d: SimDevice, ref: str) -> None:
        b = self._behaviours[ref]
        if d.target != ref:
            return  # superseded by a newer assignment
        if b.healthy:
            d.running = b.manifest
            d.trust.highest[b.manifest.name] = max(d.trust.highest.get(b.manifest.name, 0),
                                                   b.manifest.version)
            d.state, d.code, d.error = UpdateState.IDLE, None, None
        else:
            d.state, d.code, d.error = UpdateState.FAILED, "health", b.error
        self._report(d)
        self._telemetry(d)

    def _behaviour(self, m: Manifest) -> Behaviour:
        with self._lock:
            if m.ref in self._behaviours:
                return self._behaviours[m.ref]
            root = self.workdir / "bundles" / m.ref.replace("@", "-")
            root.mkdir(parents=True, exist_ok=True)
            try:
                import json

                (root / MANIFEST_NAME).write_text(json.dumps(m.to_dict()))
                for f in m.files:
                    fetch_file(file_url(self.hub_url, m.name, m.version, f.path), root / f.path,
                               f)
                verify_bundle(root, self.trusted)
                b = self._behave(load_bundle(root))
            except (UpdateError, BundleError, AgentError, InferenceError) as exc:
                b = Behaviour(m, False, str(exc))
            self._behaviours[m.ref] = b
            log.info("simulated fleet: %s healthy=%s offload rate %.3f", m.ref, b.healthy,
                     b.offload_rate)
            return b

    def _behave(self, bundle: Bundle) -> Behaviour:
        engine = Engine.open(bundle.root, "onnxruntime")
        try:
            try:
                check_health(engine)
            except HealthCheckFailed as exc:
                return Behaviour(bundle.manifest, False, str(exc))
            probs = engine.predict_batch(self.x)
            t0 = time.perf_counter()
            for xi in self.x[:50]:
                engine.run(xi)
            edge_ms = (time.perf_counter() - t0) * 1000.0 / 50
            scores = engine.policy.scores(probs)
            labels = probs.argmax(axis=1)
            return Behaviour(bundle.manifest, True, None, labels,
                             probs[np.arange(len(labels)), labels], scores,
                             scores > engine.policy.threshold, edge_ms, engine.policy.name)
        finally:
            engine.close()

    # ------------------------------------------------------------------ results

    def _results_loop(self) -> None:
        seqs: dict[str, int] = dict.fromkeys(self.devices, 0)
        last = time.monotonic()
        while not self._stop.wait(RESULTS_EVERY_S):
            now = time.monotonic()
            dt, last = now - last, now
            for d in list(self.devices.values()):
                n = int(self._rng.poisson(self.rate_hz * dt))
                if n == 0:
                    continue
                b = self._behaviours[d.running.ref]
                ids, blobs = [], []
                for _ in range(n):
                    i = int(self._rng.integers(len(self.x)))
                    rid = uuid.uuid4().hex
                    hard = bool(b.hard[i])
                    edge = int(b.labels[i])
                    cloud = int(self.cloud[i]) if hard else None
                    final = cloud if cloud is not None else edge
                    lat = b.edge_ms + (float(self._rng.lognormal(np.log(OFFLOAD_MS_MEDIAN),
                                                                 OFFLOAD_MS_SIGMA))
                                       if hard else 0.0)
                    seqs[d.id] += 1
                    ids.append(rid)
                    blobs.append(p.encode_record(
                        id=rid, device=d.id, seq=seqs[d.id], ts=time.time(), input_ref=None,
                        model=d.running.ref, backend="onnxruntime", policy=b.policy,
                        score=float(b.scores[i]), edge_label=edge,
                        edge_confidence=float(b.confidence[i]), offloaded=hard,
                        cloud_label=cloud, cloud_model="digits-cloud@1" if hard else None,
                        final_label=final, source="cloud" if hard else "edge", degraded=False,
                        latency_ms=lat, edge_ms=b.edge_ms, offload_bytes=450 if hard else 0))
                self._publish(d, p.Channel.RESULTS, p.ResultBatch(ids, blobs).encode())
                self.results_sent += n
