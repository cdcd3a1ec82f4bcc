"""Run what the prod overlay says, as processes on this machine, and break it.

    python bench/cluster.py [--overlay prod|prod-split] [--agents 4] [--seconds 40] [--rate 20]
                            [--json PATH] [--keep]

There is no Kubernetes here, so this bench does what the kubelet would with the rendered
`deploy/k3s/overlays/prod` (or `prod-split`, where a second hub StatefulSet answers the
offloads): for the hub StatefulSets (their replica counts), the migration Job,
Mosquitto and the agent DaemonSet it takes each container's command, arguments and
environment (ConfigMaps and Secrets resolved; `$(POD_NAME)`, `$(NODE_NAME)` substituted),
maps each volume's mount path to a local folder holding what the Secret would hold, and starts
the process. What cannot be the same is said in `manifest_commands_run`: the listen address
and port (a free loopback port each), the Service names (127.0.0.1), and the images' own ENV
(the bundle paths; taken from the Dockerfiles' values, pointed at this repository).

Secrets are made as deploy/README.md says: `fleet pki init` with the replicas' identities and
the agents' nodes, the broker's configuration, a fresh PostgreSQL database on the local server,
the hub's keys and tokens. Then: the migration once; the replicas; Mosquitto; the agents; inputs
at `--rate` per agent through their local APIs; SIGTERM to replica 0 at 25% of the time
(restarted when it exits), kill -9 of replica 1 at 50% (restarted after 1 s); a rollout of a
new version to every agent after the traffic; and the count of every result in the database.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import yaml

from fleet.contract.assignment import rollback_directive
from fleet.contract.bundle import pack_bundle
from fleet.contract.signing import PrivateKey, generate_keys
from fleet.identity.pki import Pki
from fleet.inference.model import Model
from fleet.lab.bundle_copy import copy_bundle
from fleet.lab.hub_metrics import scrape
from fleet.lab.pg_databases import create_database, drop_database
from fleet.lab.processes import ManagedProcess, ProcessGroup, wait_for_port, wait_until, work_folder
from fleet.lab.sim_fleet import SimFleet
from fleet.transport.mqtt import BrokerSettings, MqttConfig
from fleet.transport.ports import free_port
from models import CLOUD_BUNDLE, EDGE_BUNDLE, STREAMS_FILE

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ROOT / "deploy" / "k3s" / "overlays"
BIN = Path(sys.executable).parent


def render(overlay: str = "prod") -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(OVERLAYS / overlay)], capture_output=True,
                         text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def hub_roles(workload: dict[str, Any]) -> str:
    """The roles a hub StatefulSet's pods take (EHI_HUB_ROLES; both when unset)."""
    env = workload["spec"]["template"]["spec"]["containers"][0].get("env", [])
    return next((e["value"] for e in env if e["name"] == "EHI_HUB_ROLES"), "answer,store")


class Pod:
    """One container of a workload, made runnable here."""

    def __init__(self, workload: dict[str, Any], container: str, pod_name: str,
                 configmaps: dict[str, dict[str, str]], secrets: dict[str, dict[str, str]],
                 volumes: dict[str, Path], fieldrefs: dict[str, str]) -> None:
        spec = workload["spec"]["template"]["spec"]
        self.c = next(c for c in spec["containers"] if c["name"] == container)
        self.pod_name = pod_name
        mounts = {m["mountPath"]: volumes[m["name"]] for m in self.c.get("volumeMounts", [])}
        env: dict[str, str] = {}
        for ref in self.c.get("envFrom", []):
            env |= configmaps[ref["configMapRef"]["name"]]
        for e in self.c.get("env", []):
            if "value" in e:
                v = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], ""), e["value"])
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                v = secrets[ref["name"]][ref["key"]]
            else:
                v = fieldrefs[e["valueFrom"]["fieldRef"]["fieldPath"]]
            env[e["name"]] = v
        self.env = {k: self._local(v, mounts) for k, v in env.items()}
        self.command = [self._local(x, mounts) for x in
                        (self.c.get("command") or []) + (self.c.get("args") or [])]

    @staticmethod
    def _local(value: str, mounts: dict[str, Path]) -> str:
        for path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if value == path or value.startswith(path + "/"):
                return str(local) + value[len(path):]
        return value


def _secret_dir(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--overlay", choices=("prod", "prod-split"), default="prod")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--rate", type=float, default=20.0, help="inputs per second per agent")
    ap.add_argument("--devices", type=int, default=200,
                    help="simulated devices, each with its own identity and connection")
    ap.add_argument("--sim-rate", type=float, default=1.0,
                    help="results per second per simulated device")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    # paho 2.2 logs an error per simulated session as the fleet disconnects at the end
    logging.getLogger("fleet.transport.mqtt.paho").setLevel(logging.CRITICAL)
    docs = render(args.overlay)
    hub_set = find(docs, "StatefulSet", "cloud-hub")
    replicas = int(hub_set["spec"]["replicas"])
    grace = float(hub_set["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
    # Every hub StatefulSet's pods: cloud-hub-0.. and, split, cloud-hub-answer-0..
    hub_sets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"
                and d["metadata"]["name"].startswith("cloud-hub")}
    set_of = {f"{n}-{i}": d for n, d in hub_sets.items() for i in range(d["spec"]["replicas"])}
    configmaps = {d["metadata"]["name"]: dict(d["data"]) for d in docs if d["kind"] == "ConfigMap"}
    run: list[dict[str, Any]] = []
    out: dict[str, Any] = {"overlay": args.overlay, "replicas": replicas, "agents": args.agents,
                           "hub_roles": {n: hub_roles(d) for n, d in hub_sets.items()},
                           "cpu": platform.processor() or platform.machine(),
                           "grace_period_s": grace}
    # The cleanup stack exits last: the database goes after every process that used it.
    with contextlib.ExitStack() as cleanup, \
            work_folder(None, "ehi-cluster-", args.keep) as work, ProcessGroup() as group:
        # -- Secrets, as deploy/README.md makes them
        hubs = [f"cloud-hub-{i}" for i in range(replicas)]  # the Service's, faults' replicas
        all_hubs = list(set_of)
        nodes = [f"node-{i}" for i in range(args.agents)]
        pki = Pki.init(work / "pki", hubs=tuple(all_hubs))
        for n in nodes:
            pki.enroll(n)
        sims = [f"sim-{i:04d}" for i in range(args.devices)]
        for d in sims:
            pki.enroll(d)
        broker_port = free_port()
        pki.write_broker(mode="mtls", port=broker_port, host="127.0.0.1",
                         run_as=__import__("getpass").getuser())
        fleet_pub = generate_keys(work / "fleet.key", work / "fleet.pub")
        hub_pub = generate_keys(work / "hub-assignment.key", work / "hub-assignment.pub")
        keys = json.dumps([fleet_pub.to_text()])
        configmaps["fleet-keys"] = {"EHI_HUB_TRUSTED_KEYS": keys,
                                    "EHI_AGENT_UPDATE__TRUSTED_KEYS": keys,
                                    "EHI_AGENT_UPDATE__HUB_KEYS": json.dumps([hub_pub.to_text()])}
        token = uuid.uuid4().hex
        db_url = create_database("ehi_cluster_")
        if not args.keep:
            cleanup.callback(drop_database, db_url)
        secrets = {"hub-secrets": {"database-url": db_url, "api-token": token,
                                   "share-group": pki.share_group}}
        hub_secret_dir = _secret_dir(work / "secrets" / "hub-secrets", {
            "hub-assignment.key": (work / "hub-assignment.key").read_bytes(),
            "hub-jwt.secret": uuid.uuid4().hex.encode()})
        ca = (pki.root / "ca.crt").read_bytes()
        hub_mqtt = _secret_dir(work / "secrets" / "hub-mqtt", {"ca.crt": ca} | {
            f"{h}.{x}": (pki.root / "hubs" / h / f"client.{x}").read_bytes()
            for h in all_hubs for x in ("crt", "key")})
        agent_mqtt = _secret_dir(work / "secrets" / "edge-agent-mqtt", {"ca.crt": ca} | {
            f"{n}.{x}": (pki.root / "devices" / n / f"client.{x}").read_bytes()
            for n in nodes for x in ("crt", "key")})

        # -- the migration Job, once
        job = find(docs, "Job", "cloud-hub-migrate")
        mig = Pod(job, "migrate", "cloud-hub-migrate-0", configmaps, secrets, {}, {})
        cmd = [str(BIN / "cloud-hub"), *mig.command]
        r = subprocess.run(cmd, env={**os.environ, **mig.env}, capture_output=True, text=True,
                           check=False)
        run.append({"workload": "Job/cloud-hub-migrate", "command": mig.command,
                    "env": sorted(mig.env), "exit": r.returncode})
        if r.returncode != 0:
            raise SystemExit(f"migration failed: {r.stderr}")

        # -- Mosquitto, with the overlay's command and the generated configuration
        mq = find(docs, "StatefulSet", "mosquitto")
        mpod = Pod(mq, "mosquitto", "mosquitto-0", configmaps, secrets,
                   {"config": pki.root / "broker", "data": work / "mosquitto-data"}, {})
        (work / "mosquitto-data").mkdir()
        broker = group.start("mosquitto", mpod.command, work / "mosquitto.log")
        assert wait_for_port(broker_port, 15, broker.proc), broker.tail()
        run.append({"workload": "StatefulSet/mosquitto", "command": mpod.command,
                    "changed": f"listens on 127.0.0.1:{broker_port}, not 0.0.0.0:8883"})

        # -- the hub replicas
        ports: dict[str, int] = {}
        procs: dict[str, ManagedProcess] = {}

        def start_replica(name: str) -> None:
            volumes = {"secrets": hub_secret_dir, "mqtt": hub_mqtt,
                       "state": work / "state" / name, "tmp": work / "tmp" / name}
            for v in volumes.values():
                v.mkdir(parents=True, exist_ok=True)
            workload = set_of[name]
            pod = Pod(workload, "hub", name, configmaps, secrets, volumes,
                      {"metadata.name": name})
            port = ports.setdefault(name, free_port())
            env = {**pod.env, "EHI_HUB_MQTT__HOST": "127.0.0.1",
                   "EHI_HUB_MQTT__PORT": str(broker_port),
                   "EHI_HUB_CLOUD_BUNDLE": str(CLOUD_BUNDLE),  # the image's ENV, here
                   "EHI_HUB_ROLLOUT_TICK_S": "0.2"}
            argv = [str(BIN / "cloud-hub"), *pod.command]
            argv[argv.index("--host") + 1] = "127.0.0.1"
            argv[argv.index("--port") + 1] = str(port)
            procs[name] = group.start(name, argv, work / f"{name}.log", env=env)
            if len([x for x in run if x["workload"].startswith("StatefulSet/cloud-hub")]) < \
                    len(set_of):
                run.append({"workload": f"StatefulSet/{workload['metadata']['name']} ({name})",
                            "command": pod.command, "env": sorted(pod.env),
                            "changed": f"--host 127.0.0.1 --port {port}; broker 127.0.0.1:"
                                       f"{broker_port}; EHI_HUB_CLOUD_BUNDLE (image ENV); "
                                       "EHI_HUB_ROLLOUT_TICK_S 0.2"})

        def url(name: str) -> str:
            return f"http://127.0.0.1:{ports[name]}"

        for h in all_hubs:
            start_replica(h)
        for h in all_hubs:
            assert wait_until(functools.partial(_ready, url(h)), 90), procs[h].tail()

        # -- the agents (the DaemonSet on each node)
        ds = find(docs, "DaemonSet", "edge-agent")
        agent_ports = {}
        for n in nodes:
            volumes = {"mqtt": agent_mqtt, "state": work / "nodes" / n, "tmp": work / "tmp" / n}
            for v in volumes.values():
                v.mkdir(parents=True, exist_ok=True)
            pod = Pod(ds, "agent", f"edge-agent-{n}", configmaps, secrets, volumes,
                      {"spec.nodeName": n})
            agent_ports[n] = free_port()
            env = {**pod.env, "EHI_AGENT_MQTT__HOST": "127.0.0.1",
                   "EHI_AGENT_MQTT__PORT": str(broker_port),
                   "EHI_AGENT_LOCAL_API__HOST": "127.0.0.1",
                   "EHI_AGENT_LOCAL_API__PORT": str(agent_ports[n]),
                   "EHI_AGENT_UPDATE__HUB_URL": url(hubs[-1]),
                   "EHI_AGENT_BUNDLE": str(EDGE_BUNDLE), "XDG_STATE_HOME": str(volumes["state"])}
            group.start(f"agent-{n}", [str(BIN / "edge-agent"), *pod.command],
                        work / f"agent-{n}.log", env=env)
            if n == nodes[0]:
                run.append({"workload": "DaemonSet/edge-agent", "command": pod.command,
                            "env": sorted(pod.env),
                            "changed": "broker at 127.0.0.1, the hub's Service as the last "
                                       "replica; local API on a free loopback port; "
                                       "EHI_AGENT_BUNDLE (image ENV)"})
        for n in nodes:
            assert wait_for_port(agent_ports[n], 60), f"agent {n} did not start"

        # -- the simulated fleet: each device its own identity and connection
        x = np.load(STREAMS_FILE)["mixed_x"].astype(np.float32)
        sim = None
        if sims:
            cloud = Model.open(CLOUD_BUNDLE, "onnxruntime")
            cloud_labels = cloud.predict_batch(x).argmax(axis=1)
            cloud.close()

            def mqtt_for(device: str) -> MqttConfig:
                folder = pki.root / "devices" / device
                return BrokerSettings(port=broker_port, tls={
                    "ca_file": pki.root / "ca.crt", "cert_file": folder / "client.crt",
                    "key_file": folder / "client.key"}).session_config(device)

            sim = SimFleet(broker_port=broker_port, hub_url=url(hubs[-1]), hub_keys=[hub_pub],
                           trusted=[fleet_pub], factory=EDGE_BUNDLE, stream_x=x,
                           cloud_labels=cloud_labels, workdir=work / "sim",
                           devices=len(sims), rate_hz=args.sim_rate, mqtt_for=mqtt_for)
            sim.start(connect_timeout_s=60)

        # -- traffic, and the faults
        answers: dict[str, int] = dict.fromkeys(nodes, 0)
        errors = {"count": 0}
        stop = threading.Event()

        def drive(n: str) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", agent_ports[n], timeout=10)
            i = 0
            while not stop.is_set():
                body = json.dumps({"input": x[i % len(x)].tolist(),
                                   "input_ref": f"{n}:{i}"}).encode()
                try:
                    conn.request("POST", "/v1/infer", body,
                                 {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    r.read()
                    if r.status == 200:
                        answers[n] += 1
                    else:
                        errors["count"] += 1
                except (OSError, http.client.HTTPException):
                    errors["count"] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", agent_ports[n], timeout=10)
                i += 1
                stop.wait(1.0 / args.rate)

        threads = [threading.Thread(target=drive, args=(n,), daemon=True) for n in nodes]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        faults = []
        time.sleep(args.seconds * 0.25)
        victim = procs[hubs[0]]
        ts = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)
        victim.proc.wait(grace + 5)
        out["sigterm_exit_seconds"] = round(time.monotonic() - ts, 2)
        faults.append({"at_s": round(ts - t0, 1), "fault": f"SIGTERM {hubs[0]}",
                       "exit": victim.proc.returncode})
        start_replica(hubs[0])
        time.sleep(max(0.0, args.seconds * 0.5 - (time.monotonic() - t0)))
        if replicas > 1:
            ts = time.monotonic()
            procs[hubs[1]].kill()
            faults.append({"at_s": round(ts - t0, 1), "fault": f"kill -9 {hubs[1]}"})
            time.sleep(1.0)
            start_replica(hubs[1])
        time.sleep(max(0.0, args.seconds - (time.monotonic() - t0)))
        stop.set()
        for t in threads:
            t.join(15)
        for h in all_hubs:
            assert wait_until(functools.partial(_ready, url(h)), 90), procs[h].tail()
        produced = sum(answers.values())
        api = httpx.Client(base_url=url(hubs[-1]), timeout=60,
                           headers={"Authorization": f"Bearer {token}"})
        settle = time.monotonic() + 60
        at_hub = 0
        while time.monotonic() < settle:  # the agents' outboxes drain to the hub
            at_hub = sum(api.get("/v1/results/count", params={"device": n}).json()["count"]
                         for n in nodes)
            if at_hub >= produced:
                break
            time.sleep(0.5)
        # Duplicates: the database keys results by (device, id); count distinct refs as well.
        refs: set[str] = set()
        rows = sim_rows = 0
        cursor = 0
        while True:
            page = api.get("/v1/results", params={"cursor": cursor, "limit": 1000}).json()
            for rec in page["items"]:
                if rec["device"].startswith("node-"):  # the real agents' results
                    refs.add(str(rec.get("input_ref")))
                    rows += 1
                else:
                    sim_rows += 1
            if page["next_cursor"] is None:
                break
            cursor = page["next_cursor"]

        # -- a rollout of a new version to every agent
        # (the version the agents run, version 2, and the signed way back that a rollout needs)
        for version in (1, 2):
            b = copy_bundle(EDGE_BUNDLE, work / f"digits-edge-{version}", version=version,
                            key=work / "fleet.key")
            r2 = api.post("/v1/models", content=pack_bundle(b))
            if r2.status_code not in (201, 409):
                break
        back = rollback_directive("digits-edge", 2, 1,
                                  datetime.now(UTC) + timedelta(days=1),
                                  PrivateKey.read(work / "fleet.key"))
        if r2.status_code == 201:
            r2 = api.post("/v1/models/digits-edge/rollbacks", json=back)
        rollout_completed = False
        if r2.status_code != 201:
            out["rollout_state"] = f"refused: {r2.status_code} {r2.text[:200]}"
        else:
            ro = api.post("/v1/rollouts", json={"model": "digits-edge", "version": 2,
                                                "stages": ["50%", "100%"], "bake_s": 0,
                                                "min_results": 0}).json()
            if "id" not in ro:
                out["rollout_state"] = f"refused: {ro}"
            end = time.monotonic() + (120 if "id" in ro else 0)
            while time.monotonic() < end:
                state = api.get(f"/v1/rollouts/{ro['id']}").json()["state"]
                if state in ("completed", "halted", "aborted", "rolled_back"):
                    rollout_completed = state == "completed"
                    out["rollout_state"] = state
                    break
                time.sleep(0.5)
        if sim is not None:
            out["simulated_devices_on_v2"] = sim.models().get("digits-edge@2", 0)
            sim.stop()
        out |= {
            "simulated_devices": len(sims), "sim_results_at_hub": sim_rows,
            "seconds": args.seconds, "results_produced": produced, "results_at_hub": at_hub,
            "lost": max(0, produced - len(refs)), "duplicates_in_db": rows - len(refs),
            "answers_not_200": errors["count"],
            "offloads_answered_by": {h: scrape(url(h), "ehi_hub_offloads_answered_total")
                                     for h in all_hubs},
            "rollout_completed": rollout_completed, "faults": faults,
            "manifest_commands_run": run,
        }
        out["offloads_unanswered_by_deadline"] = sum(
            scrape(f"http://127.0.0.1:{agent_ports[n]}",
                    'ehi_agent_events_total{event="fallbacks"}')
            for n in nodes)
        api.close()
    print(table(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    ok = (out["lost"] == 0 and out["duplicates_in_db"] == 0 and out["rollout_completed"]
          and out["sigterm_exit_seconds"] <= grace
          # every replica that answers answered offloads; one that only stores, none
          and all((v > 0) == ("answer" in hub_roles(set_of[h]))
                  for h, v in out["offloads_answered_by"].items()))
    return 0 if ok else 1


def _ready(u: str) -> bool:
    try:
        return httpx.get(f"{u}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def table(r: dict[str, Any]) -> str:
    rows = [
        ("overlay, hub roles", f"{r['overlay']}: " + ", ".join(
            f"{k} {v}" for k, v in r["hub_roles"].items())),
        ("hub replicas / agents / simulated devices", f"{r['replicas']} / {r['agents']} / "
                                                      f"{r['simulated_devices']}"),
        ("simulated results at the hub (sent once: no outbox)", f"{r['sim_results_at_hub']:,}"),
        ("simulated devices on the new version", str(r.get("simulated_devices_on_v2", "-"))),
        ("results produced / at the hub", f"{r['results_produced']:,} / {r['results_at_hub']:,}"),
        ("lost / duplicates in the database", f"{r['lost']} / {r['duplicates_in_db']}"),
        ("answers other than 200", str(r["answers_not_200"])),
        ("offloads answered by", ", ".join(f"{k} {v:g}" for k, v in
                                           r["offloads_answered_by"].items())),
        ("offloads answered at the edge (deadline)", f"{r['offloads_unanswered_by_deadline']:g}"),
        ("SIGTERM exit (s) / grace period", f"{r['sigterm_exit_seconds']} / "
                                            f"{r['grace_period_s']:g}"),
        ("rollout to every agent", str(r.get("rollout_state", "not started"))),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append("faults: " + "; ".join(f"{f['at_s']} s {f['fault']}" for f in r["faults"]))
    lines.append("commands taken from the rendered overlay:")
    for c in r["manifest_commands_run"]:
        lines.append(f"  {c['workload']}: {' '.join(c['command'])}"
                     + (f"  [{c['changed']}]" if c.get("changed") else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
