"""Attack the fleet as a compromised device and an anonymous client would, with real processes.

    python bench/security.py [--devices 6] [--fuzz 10000] [--hostile 20000]
                             [--api-requests 2000] [--agent-requests 1000]
                             [--mode mtls|password] [--json PATH]

Starts its own confined Mosquitto (the configuration `fleet pki` generates, on a free port),
`cloud-hub serve` as a process (SQLite, a fleet key trusted, an API token) and one real agent,
then:

- cross-device: every device publishes on every channel of every other device (writes) and
  subscribes to every other device's topics and to `#` and the hubs' default group (reads);
  a write is denied when the broker refuses it and the hub stores nothing of it, a read when no
  other device's message reaches the subscriber while all of them send;
- revoked: a device is revoked and the broker reloaded; it tries every channel and to connect
  again;
- archive bombs: pax headers declaring 1 GiB in every codec the registry reads (none, gzip,
  bzip2, xz), an unsigned 400 MB gzip member, a signed manifest with a member longer than it
  says; the hub's RSS is sampled throughout;
- fuzz: an enrolled device (the realistic attacker) sends `--fuzz` malformed, truncated,
  bit-flipped, oversized and wrong-kind messages on every channel the hub reads, while the
  agent keeps answering inputs and sending results; the API is polled for 5xx meanwhile;
- the API: writes without and with the token, oversized uploads, numbers beyond 64 bits;
- isolation (fleet/lab/hostile_phases.py): `--hostile` messages generated from each channel's
  schema and mutated, from one enrolled device within its quota, while a second device sends
  valid results, reports and telemetry (alone first: the baseline); a worker made to hang must
  turn /readyz; concurrent uploads of one name@version;
- `--api-requests` hostile requests over every route of the OpenAPI schema, on a hub in `jwt`
  and one in `open` mode (limits off there: validation is what is measured), then the limits
  themselves: 600 bad tokens from one address, and anonymous reads and writes in `open` mode;
- `--agent-requests` malformed, lying and trickled bodies to the agent's local API.

Figures: cross_device_attempts, cross_device_denied, revoked_attempts, revoked_denied,
api_cases, api_cases_as_expected, fuzz_messages, hub_crashes, hub_5xx, valid_results_lost,
max_hub_rss_mb; hostile_messages, hostile_refused_by_reason, hub_workers_died,
victim_results_sent/acked, victim_ack_p99_ms(_baseline), victim_report_delay_max_s,
readyz_truthful, api_hostile_requests, api_5xx, refused_logins_limited, open_mode_limited,
registry_race_trials, registry_race_mismatches, agent_hostile_requests, agent_5xx_or_drops.
"""

from __future__ import annotations

import argparse
import bz2
import functools
import gzip
import io
import json
import lzma
import platform
import random
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import psutil

from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from edge_agent.local_api import LocalApi
from fleet.contract import protocol as p
from fleet.contract.signing import generate_keys
from fleet.identity.pki import Pki, reload_broker
from fleet.lab import hostile_agent, hostile_api, hostile_phases
from fleet.lab.brokers import start_broker, start_confined_broker
from fleet.lab.bundle_copy import copy_bundle
from fleet.lab.hub_metrics import metric_samples
from fleet.lab.mqtt_probe import Probe
from fleet.lab.processes import ProcessGroup, start_hub, wait_until
from fleet.transport.ports import free_port
from models import EDGE_BUNDLE

HARD = np.random.default_rng(0).uniform(0, 16, (8, 8)).astype(np.float32)
SETTLE_S = 0.5
# The hub's worker stall limit in this bench: short, so that the hung worker is seen quickly.
STALL_S = 5.0


def cross_device(pki: Pki, port: int, mode: str, devices: list[str]) -> dict[str, int]:
    probes = {d: Probe(d, port, mode, pki.root / "devices" / d) for d in devices}  # type: ignore[arg-type]
    for pr in probes.values():
        assert pr.connect(), pr.connect_reason
    hub = Probe("hub-0", port, mode, pki.root / "hubs" / "hub-0")  # type: ignore[arg-type]
    assert hub.connect(), hub.connect_reason
    for c in sorted(p.FROM_DEVICE):
        hub.subscribe(p.hub_filter(c, True, pki.share_group))
    reads = 0
    for d, pr in probes.items():
        pr.subscribe("#")
        pr.subscribe(f"$share/{p.HUB_SHARE_GROUP}/{p.TOPIC_ROOT}/+/+")
        reads += 2
        for other in devices:
            if other != d:
                for c in sorted(p.FROM_DEVICE | p.TO_DEVICE):
                    pr.subscribe(p.topic(other, c))
                    reads += 1
    time.sleep(SETTLE_S)
    writes = denied = 0
    for d, pr in probes.items():
        for other in devices:
            if other == d:
                continue
            for c in sorted(p.FROM_DEVICE | p.TO_DEVICE):
                writes += 1
                denied += pr.publish(p.topic(other, c), b"forged:" + d.encode()) is False
    # Everyone's legitimate traffic, both ways, while the intruders listen.
    for d, pr in probes.items():
        for c in sorted(p.FROM_DEVICE):
            pr.publish(p.topic(d, c), b"own:" + d.encode())
        for c in sorted(p.TO_DEVICE):
            hub.publish(p.topic(d, c), b"hub:" + d.encode())
    time.sleep(2 * SETTLE_S)
    forged_at_hub = sum(1 for _, m in hub.received if m.startswith(b"forged"))
    hub_got_own = sum(1 for _, m in hub.received if m.startswith(b"own"))
    leaks = 0
    for d, pr in probes.items():
        leaks += sum(1 for t, _ in pr.received if t.split("/")[2] != d)
    read_denied = reads if leaks == 0 else 0
    for pr in [*probes.values(), hub]:
        pr.close()
    return {"cross_device_attempts": writes + reads,
            "cross_device_denied": (denied if forged_at_hub == 0 else 0) + read_denied,
            "cross_device_writes": writes, "cross_device_write_denied": denied,
            "cross_device_reads": reads, "foreign_messages_received": leaks,
            "forged_at_hub": forged_at_hub,
            "own_messages_at_hub": hub_got_own,
            "own_messages_sent": len(devices) * len(p.FROM_DEVICE)}


def revoked(pki: Pki, port: int, mode: str, device: str, broker_pid: int) -> dict[str, int]:
    pr = Probe(device, port, mode, pki.root / "devices" / device)  # type: ignore[arg-type]
    assert pr.connect(), pr.connect_reason
    pki.revoke(device)
    reload_broker(pid=broker_pid)
    time.sleep(1.0)
    attempts = denied = 0
    for c in sorted(p.FROM_DEVICE):
        attempts += 1
        denied += pr.publish(p.topic(device, c), b"after revoke", timeout=3) is not True
    pr.close()
    again = Probe(device, port, mode, pki.root / "devices" / device,  # type: ignore[arg-type]
                  client_id=device + "-again")
    attempts += 1
    denied += not again.connect(5)
    return {"revoked_attempts": attempts, "revoked_denied": denied}


def _pax_bomb(declared: int) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = declared
    return info.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * (256 << 10)


def _zero_member(size: int) -> bytes:
    """An unsigned 'bundle' whose model file is `size` zero bytes, gzip-compressed (streamed,
    so the bench does not hold `size` bytes itself)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w|") as tf:
        manifest = json.dumps({"schema": 1, "name": "bomb", "version": 1}).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tf.addfile(info, io.BytesIO(manifest))
        info = tarfile.TarInfo("model.onnx")
        info.size = size

        class Zeros(io.RawIOBase):
            left = size

            def readinto(self, b: Any) -> int:
                n = min(len(b), self.left)
                b[:n] = bytes(n)
                self.left -= n
                return n

        tf.addfile(info, Zeros())
    return buf.getvalue()


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self.stop.wait(0.02)


def bombs(api: httpx.Client, work: Path, key: Path) -> dict[str, Any]:
    cases: dict[str, bytes] = {
        "pax-1GiB-none": _pax_bomb(1 << 30), "pax-1GiB-gzip": gzip.compress(_pax_bomb(1 << 30)),
        "pax-1GiB-bzip2": bz2.compress(_pax_bomb(1 << 30)),
        "pax-1GiB-xz": lzma.compress(_pax_bomb(1 << 30)),
        "pax-2GiB-bzip2": bz2.compress(_pax_bomb(2 << 30)),
        "gzip-400MB-unsigned": _zero_member(400 << 20),
        # under the upload limit once expanded: read to its end, refused for its signature,
        # nothing written
        "gzip-15MB-unsigned": _zero_member(15 << 20),
    }
    signed = copy_bundle(EDGE_BUNDLE, work / "signed", version=7, key=key)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for f in sorted(signed.iterdir()):
            data = f.read_bytes() + (b"\0" * (64 << 20) if f.name == "model.onnx" else b"")
            info = tarfile.TarInfo(f.name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cases["signed-but-longer-member"] = buf.getvalue()
    out = {}
    for name, body in cases.items():
        t0 = time.monotonic()
        r = api.post("/v1/models", content=body)
        out[name] = {"status": r.status_code, "bytes": len(body),
                     "seconds": round(time.monotonic() - t0, 2),
                     "detail": str(r.json().get("detail", ""))[:100]}
    return out


def fuzz_payloads(n: int, rng: random.Random) -> list[tuple[p.Channel, bytes]]:
    good = {
        p.Channel.OFFLOAD: p.Offload("o", "m", np.zeros((8, 8), np.float32), 100, 0, 0, 0).encode(),
        p.Channel.TELEMETRY: p.encode_frame(p.Kind.TELEMETRY, {"model": "x"}),
        p.Channel.STATUS: p.status_payload("online", "fuzzer"),
    }
    channels = sorted(p.FROM_DEVICE)
    out = []
    for i in range(n):
        c = channels[i % len(channels)]
        base = good.get(c, good[p.Channel.OFFLOAD])
        kind = i % 6
        if kind == 0:
            data = rng.randbytes(rng.randint(0, 2048))
        elif kind == 1:
            data = base[:rng.randint(0, len(base))]
        elif kind == 2:
            b = bytearray(base)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            data = bytes(b)
        elif kind == 3:
            data = p.encode_frame(p.Kind(rng.randint(1, 9)), {"x": "y" * rng.randint(0, 9000)})
        elif kind == 4:
            hdr = json.dumps({"dtype": rng.choice(["float32", "complex64", "uint8", "object"]),
                              "shape": [rng.randint(-2, 1 << 20)] * rng.randint(0, 9),
                              "id": rng.choice([1, None, "x" * 300, [1]])}).encode()
            data = b"EH\x01" + bytes([rng.randint(0, 12)]) + len(hdr).to_bytes(4, "big") + hdr
        else:
            data = base + rng.randbytes(rng.randint(1, 64))
        out.append((c, data))
    return out


def _ready(c: httpx.Client) -> bool:
    return c.get("/readyz").status_code == 200


def _refused_rows(api: httpx.Client) -> int:
    """Audit rows of refused attempts (401, 403) the hub keeps."""
    n, cursor = 0, None
    while True:
        page = api.get("/v1/audit", params={"limit": 1000, **({"cursor": cursor} if cursor
                                                               else {})}).json()
        n += sum(1 for e in page["items"] if e["status"] in (401, 403))
        cursor = page.get("next_cursor")
        if not cursor:
            return n


def api_phases(group: ProcessGroup, work: Path, requests: int) -> dict[str, Any]:
    """Hostile requests on every route of hubs in `jwt` and `open` mode (limits off, on a plain
    broker of their own), then `open` mode's limits at their defaults."""
    plain = start_broker(group, work, "auto")
    out: dict[str, Any] = {}
    total = five_xx = 0
    for mode, limits in (("jwt", False), ("open", False), ("open", True)):
        d = work / f"hub-{mode}-{'limits' if limits else 'fuzz'}"
        d.mkdir()
        env = {"EHI_HUB_AUTH__MODE": mode, "EHI_HUB_API_TOKEN": "fuzz-token",
               "EHI_HUB_AUTH__SECRET_FILE": str(d / "jwt.secret"),
               "EHI_HUB_REPLICA_ID": f"hub-{mode}{'-l' if limits else ''}",
               "EHI_HUB_MQTT__SHARE_GROUP": f"g{len(out)}"}
        if not limits:
            env |= {"EHI_HUB_AUTH__RATE_PER_S": "0", "EHI_HUB_AUTH__ADDRESS_RATE_PER_S": "0",
                    "EHI_HUB_AUTH__REFUSED_PER_S": "0"}
        port = free_port()
        start_hub(group, d, port=port, broker_port=plain.port, log_path=d / "hub.log",
                  env=env)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60,
                          headers={"Authorization": "Bearer fuzz-token"}) as c:
            assert wait_until(functools.partial(_ready, c), 60)
            if limits:
                flood = hostile_api.open_mode_flood(url)
                out |= {"open_mode_flood": flood, "open_mode_limited": flood["limited"]}
                continue
            fz = hostile_api.fuzz_api(c, requests, random.Random(len(out)))
        out[f"api_hostile_{mode}"] = fz
        total += fz["requests"]
        five_xx += fz["five_xx"] + fz["dropped"]
    return out | {"api_hostile_requests": total, "api_5xx": five_xx}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=6)
    ap.add_argument("--fuzz", type=int, default=10_000)
    ap.add_argument("--hostile", type=int, default=20_000)
    ap.add_argument("--api-requests", type=int, default=2000)
    ap.add_argument("--agent-requests", type=int, default=1000)
    ap.add_argument("--mode", choices=["mtls", "password"], default="mtls")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    devices = [f"dev-{i}" for i in range(args.devices)]
    with tempfile.TemporaryDirectory(prefix="ehi-security-") as tmp, ProcessGroup() as group:
        work = Path(tmp)
        pki = Pki.init(work / "pki")
        for d in [*devices, "fuzzer", "agent-1", "revokee", "victim", "attacker"]:
            pki.enroll(d)
        broker = start_confined_broker(group, pki, args.mode)
        result: dict[str, Any] = {"mode": args.mode, "devices": args.devices,
                                  "cpu": platform.processor() or platform.machine()}
        result |= cross_device(pki, broker.port, args.mode, devices)
        result |= revoked(pki, broker.port, args.mode, "revokee", broker.process.pid)

        key = work / "fleet.key"
        pub = generate_keys(key, work / "fleet.pub")
        token = "bench-token"
        env = pki.hub_env() | {
            "EHI_HUB_TRUSTED_KEYS": json.dumps([pub.to_text()]), "EHI_HUB_API_TOKEN": token,
            "EHI_HUB_MAX_BUNDLE_BYTES": str(16 << 20), "EHI_HUB_AUTH__MODE": "jwt",
            "EHI_HUB_AUTH__SECRET_FILE": str(work / "jwt.secret"),
            "EHI_HUB_WORKER_STALL_S": str(STALL_S)}
        hub_port = free_port()
        hub = start_hub(group, work, port=hub_port, broker_port=broker.port,
                        log_path=work / "hub.log", env=env)
        url = f"http://127.0.0.1:{hub_port}"
        rss = RssSampler(hub.pid)
        rss.start()
        with httpx.Client(base_url=url, timeout=120,
                          headers={"Authorization": f"Bearer {token}"}) as api, \
                httpx.Client(base_url=url, timeout=30) as anon:
            assert wait_until(lambda: anon.get("/readyz").status_code == 200, 60), hub.tail()
            result["bombs"] = bombs(api, work, key)

            def as_role(role: str, subject: str) -> httpx.Client:
                t = api.post("/v1/tokens", json={"subject": subject, "role": role}).json()
                return httpx.Client(base_url=url, timeout=30,
                                    headers={"Authorization": f"Bearer {t['token']}"})

            viewer, operator = as_role("viewer", "vera"), as_role("operator", "otto")
            flooder = as_role("viewer", "flood")

            def flood() -> httpx.Response:
                """Reads as fast as one client goes: the last one is refused (429)."""
                r = flooder.get("/v1/results/count")
                for _ in range(400):
                    if r.status_code != 200:
                        break
                    r = flooder.get("/v1/results/count")
                return r
            expected = [
                ("read without token", lambda: anon.get("/v1/results"), 401),
                ("hard example input as viewer",
                 lambda: viewer.get("/v1/hard-examples/x/input"), 403),
                ("write as viewer", lambda: viewer.put("/v1/devices/dev-0/labels",
                                                       json={"labels": {}}), 403),
                ("audit log as operator", lambda: operator.get("/v1/audit"), 403),
                ("token issuance as operator", lambda: operator.post(
                    "/v1/tokens", json={"subject": "x", "role": "admin"}), 403),
                ("forged token", lambda: anon.get("/v1/results", headers={
                    "Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl"}), 401),
                ("flood of reads", flood, 429),
                ("body over the limit", lambda: operator.put(
                    "/v1/devices/dev-0/labels", content=b"{" + b" " * (2 << 20) + b"}",
                    headers={"Content-Type": "application/json"}), 413),
                ("audit log as admin", lambda: api.get("/v1/audit"), 200),
                ("write without token", lambda: anon.put("/v1/devices/dev-0/labels",
                                                         json={"labels": {}}), 401),
                ("upload without token", lambda: anon.post("/v1/models", content=b"x"), 401),
                ("upload over the limit", lambda: api.post("/v1/models",
                                                           content=b"\0" * (17 << 20)), 413),
                ("cursor beyond 64 bits", lambda: viewer.get(f"/v1/results?cursor={1 << 64}"),
                 422),
                ("version beyond 64 bits", lambda: viewer.get(f"/v1/models/x/{1 << 64}"), 422),
                ("rollout id beyond 64 bits", lambda: api.post(f"/v1/rollouts/{1 << 64}/pause"),
                 422),
                ("time not finite", lambda: viewer.get("/v1/stats?since=inf"), 422),
                ("bundle name a path", lambda: viewer.get("/v1/models/.x/1"), 422),
                ("device id too long", lambda: viewer.get("/v1/devices/" + "d" * 65), 422),
                ("valid read", lambda: viewer.get("/v1/results?limit=5"), 200),
                ("valid write as operator", lambda: operator.put(
                    "/v1/devices/dev-0/labels", json={"labels": {"a": "b"}}), 404),
            ]
            api_cases = {}
            for name, call, want in expected:
                got = call().status_code
                api_cases[name] = {"want": want, "got": got}
            result["api"] = api_cases
            result["api_cases"] = len(api_cases)
            result["api_cases_as_expected"] = sum(1 for v in api_cases.values()
                                                  if v["want"] == v["got"])
            result["api_not_covered"] = []

            # Fuzz while a real agent answers inputs and sends its results.
            mqtt = pki.device_mqtt("agent-1")
            agent = Agent(AgentSettings(device_id="agent-1", bundle=EDGE_BUNDLE,
                                        telemetry_interval_s=1, mqtt=mqtt,
                                        results={"flush_interval_s": 0.05,
                                                 "outbox_dir": str(work / "outbox")}))
            agent.start(wait_connected_s=10)
            fuzzer = Probe("fuzzer", broker.port, args.mode, pki.root / "devices" / "fuzzer")
            assert fuzzer.connect(), fuzzer.connect_reason
            rng = random.Random(0)
            five_xx = polls = 0
            stop = threading.Event()

            def poll() -> None:
                nonlocal five_xx, polls
                while not stop.is_set():
                    for path in ("/readyz", "/v1/stats", "/v1/devices", "/v1/results/count"):
                        try:
                            five_xx += viewer.get(path).status_code >= 500
                        except httpx.HTTPError:
                            five_xx += 1
                        polls += 1
                    stop.wait(0.1)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            answered = 0
            t0 = time.monotonic()
            for i, (c, data) in enumerate(fuzz_payloads(args.fuzz, rng)):
                fuzzer.client.publish(p.topic("fuzzer", c), data, qos=1)
                if i % 20 == 0:
                    agent.infer(HARD if i % 40 == 0 else np.zeros((8, 8), np.float32),
                                deadline_ms=500)
                    answered += 1
            fuzz_s = time.monotonic() - t0
            drained = agent.drain(60)
            stop.set()
            poller.join()
            at_hub = api.get("/v1/results/count", params={"device": "agent-1"}).json()["count"]
            local = LocalApi(agent, "127.0.0.1", free_port(), 1 << 20)
            local.start()
            valid_input = (json.dumps({"input": np.zeros((8, 8)).tolist()}).encode(),
                           {"Content-Type": "application/json"})
            ag = hostile_agent.attack(local.port, args.agent_requests, 16, rng, valid_input)
            local.stop()
            result |= {"agent_hostile_requests": ag["requests"],
                       "agent_5xx_or_drops": ag["five_xx_or_dropped"],
                       "agent_hostile_statuses": ag["statuses"],
                       "agent_still_answering": ag["valid_answered"] == ag["valid_sent"]}
            agent.stop()
            fuzzer.close()
            result |= {"fuzz_messages": args.fuzz, "fuzz_seconds": round(fuzz_s, 1),
                       "agent_answers": answered, "agent_results_at_hub": at_hub,
                       "agent_drained": drained,
                       "valid_results_lost": max(0, answered - at_hub),
                       "api_polls": polls, "hub_5xx": five_xx,
                       "hub_crashes": 0 if hub.running() else 1}
            metrics = anon.get("/metrics").text
            result["hub_bad_messages"] = {
                labels["reason"]: v
                for labels, v in metric_samples(metrics, "ehi_hub_bad_messages_total")}

            result |= hostile_phases.hostile_messages(
                broker.port, args.mode, pki.root, api, anon, args.hostile, 10.0,
                random.Random(1), work)
            result |= hostile_phases.registry_race(api, work, key, EDGE_BUNDLE, 20)
            audit_before = _refused_rows(api)
            logins = hostile_api.refused_logins(url)
            result |= {"refused_logins": logins, "refused_logins_limited": logins["limited"],
                       "refused_audit_rows": _refused_rows(api) - audit_before}
            result |= hostile_phases.readyz_truthful(url, work / "hub.db", broker.port,
                                                     args.mode, pki.root, STALL_S)
        result |= api_phases(group, work, args.api_requests)
        rss.stop.set()
        rss.join()
        result["max_hub_rss_mb"] = round(rss.peak / 2**20, 1)
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = (result["cross_device_denied"] == result["cross_device_attempts"]
          and result["revoked_denied"] == result["revoked_attempts"]
          and result["hub_crashes"] == 0 and result["hub_5xx"] == 0
          and result["valid_results_lost"] == 0 and result["max_hub_rss_mb"] < 500
          and result["api_cases_as_expected"] == result["api_cases"]
          and result["hub_workers_died"] == 0
          and result["victim_results_acked"] == result["victim_results_sent"]
          == result["victim_results_stored"]
          and result["victim_ack_p99_ms"] is not None
          and result["victim_ack_p99_ms_baseline"] is not None
          and result["victim_ack_p99_ms"] <= 2 * result["victim_ack_p99_ms_baseline"]
          and result["victim_report_delay_max_s"] is not None
          and result["victim_report_delay_max_s"] <= 1.0
          and result["readyz_truthful"] and result["api_5xx"] == 0
          and result["refused_logins_limited"] and result["open_mode_limited"]
          and result["registry_race_mismatches"] == 0 and result["agent_5xx_or_drops"] == 0
          and result["agent_still_answering"])
    return 0 if ok else 1


def table(r: dict[str, Any]) -> str:
    rows = [
        ("broker mode", r["mode"]),
        ("cross-device attempts denied", f"{r['cross_device_denied']} / "
                                         f"{r['cross_device_attempts']} "
                                         f"(writes {r['cross_device_write_denied']} / "
                                         f"{r['cross_device_writes']}, foreign messages "
                                         f"received {r['foreign_messages_received']})"),
        ("own messages at the hub", f"{r['own_messages_at_hub']} / {r['own_messages_sent']}"),
        ("revoked attempts denied", f"{r['revoked_denied']} / {r['revoked_attempts']}"),
        ("API cases as expected", f"{r['api_cases_as_expected']} / {r['api_cases']}"
                                  + (f" (not covered: {', '.join(r['api_not_covered'])})"
                                     if r["api_not_covered"] else "")),
        ("fuzzed messages", f"{r['fuzz_messages']:,} in {r['fuzz_seconds']} s"),
        ("agent answers / results at the hub", f"{r['agent_answers']} / "
                                               f"{r['agent_results_at_hub']}"),
        ("valid results lost", str(r["valid_results_lost"])),
        ("hub crashes / 5xx", f"{r['hub_crashes']} / {r['hub_5xx']} of {r['api_polls']} polls"),
        ("hub peak RSS (MB)", str(r["max_hub_rss_mb"])),
        ("hostile messages (one device)", f"{r['hostile_messages']:,} in "
                                          f"{r['hostile_seconds']} s; refused "
                                          f"{sum(r['hostile_refused_by_reason'].values()):,}"),
        ("hub workers died / step errors", f"{r['hub_workers_died']} / "
                                           f"{r['hub_worker_errors']}"),
        ("victim results sent / acked / stored", f"{r['victim_results_sent']} / "
                                                 f"{r['victim_results_acked']} / "
                                                 f"{r['victim_results_stored']}"),
        ("victim ack p99 (ms) alone / attacked", f"{r['victim_ack_p99_ms_baseline']} / "
                                                 f"{r['victim_ack_p99_ms']}"),
        ("victim report stored within (s, max)", str(r["victim_report_delay_max_s"])),
        ("/readyz truthful (a hung worker)", str(r["readyz_truthful"])),
        ("API hostile requests / 5xx", f"{r['api_hostile_requests']:,} / {r['api_5xx']}"),
        ("refused logins limited / audit rows", f"{r['refused_logins_limited']} / "
                                                f"{r['refused_audit_rows']} of 600"),
        ("open mode limited", str(r["open_mode_limited"])),
        ("registry race mismatches", f"{r['registry_race_mismatches']} of "
                                     f"{r['registry_race_trials']}"),
        ("agent hostile requests / 5xx or drops", f"{r['agent_hostile_requests']:,} / "
                                                  f"{r['agent_5xx_or_drops']} (still "
                                                  f"answering: {r['agent_still_answering']})"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append("archive bombs:")
    for name, b in r["bombs"].items():
        lines.append(f"  {name:<26} {b['bytes']:>10,} bytes -> {b['status']} in {b['seconds']} s"
                     f"  {b['detail']}")
    lines.append(f"refused by the hub: {r['hub_bad_messages']}")
    lines.append(f"hostile messages refused by reason: {r['hostile_refused_by_reason']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
