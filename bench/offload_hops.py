"""Where an offloaded input's time goes, hop by hop: one agent offloading every input to an idle
hub, one input at a time.

    python bench/offload_hops.py [--inputs 500] [--json PATH]

Starts its own Mosquitto and `cloud-hub serve` (SQLite), and an agent in this process with its
real MQTT session, a threshold that makes every input hard and the digits bundle. For each
input of the mixed stream, timestamps on the agent's side (one clock) and the hub's own
account of its time (`hub_ms` in the answer) split the round trip into:

- edge:      preprocessing, the edge model and the policy (`Engine.run`);
- publish:   encoding the offload and handing it to paho (`transport.publish`);
- wire:      from the publish call's return to the answer reaching the agent's handler on
             paho's network thread, less the time inside the hub: both broker legs, both
             paho network threads, the sockets;
- hub:       the hub's receipt of the offload to its publish of the answer (`hub_ms`);
- wake:      from the answer on the network thread to the waiting caller running again;
- finish:    the result record and the outbox append, after the caller wakes.

Prints the median, p90 and p99 of each hop and of the whole; `--json` writes them. The publish
and wire hops can trade places: when the caller's thread loses the core inside the publish
call, the answer may reach the network thread before the call returns (a short wire, a long
publish); their sum and the total are what to compare between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from fleet.contract import protocol as p
from fleet.inference.cpu import cpu_name
from fleet.lab.brokers import start_broker
from fleet.lab.percentiles import percentile
from fleet.lab.processes import ProcessGroup, start_hub, wait_until, work_folder
from fleet.transport.ports import free_port
from fleet.transport.tuning import tune_gil_switch_interval
from models import EDGE_BUNDLE, STREAMS_FILE

HOPS = ("edge", "publish", "wire", "hub", "wake", "finish", "total")


def measure(broker_port: int, n: int, tmp: Path) -> dict[str, list[float]]:
    settings = AgentSettings(
        device_id="hops-0", bundle=EDGE_BUNDLE, threshold=-1.0, telemetry_interval_s=3600,
        mqtt={"port": broker_port}, local_api={"port": -1},
        offload={"deadline_ms": 1000.0},
        results={"outbox_dir": tmp / "outbox", "flush_interval_s": 0.2})
    agent = Agent(settings)
    marks: dict[str, float] = {}
    hub_ms: list[float] = []
    run, publish, deliver = agent.engine.run, agent.transport.publish, agent.pending.deliver

    def timed_run(raw: np.ndarray) -> Any:
        marks["edge0"] = time.perf_counter()
        out = run(raw)
        marks["edge1"] = time.perf_counter()
        return out

    def timed_publish(topic: str, payload: bytes, *a: Any, **kw: Any) -> bool:
        offload = topic.endswith("/offload")
        if offload:
            marks["pub0"] = time.perf_counter()
        ok = publish(topic, payload, *a, **kw)
        if offload:
            marks["pub1"] = time.perf_counter()
        return ok

    def timed_deliver(answer: p.Answer) -> bool:
        marks["answer"] = time.perf_counter()
        hub_ms.append(answer.hub_ms)
        return deliver(answer)

    agent.engine.run = timed_run  # type: ignore[method-assign]
    agent.transport.publish = timed_publish  # type: ignore[method-assign]
    agent.pending.deliver = timed_deliver  # type: ignore[method-assign]
    wait_marks: dict[str, float] = {}
    wait = agent.pending.wait

    def timed_wait(offload_id: str, timeout_s: float) -> p.Answer | None:
        a = wait(offload_id, timeout_s)
        wait_marks["woke"] = time.perf_counter()
        return a

    agent.pending.wait = timed_wait  # type: ignore[method-assign]
    agent.start()
    if not wait_until(lambda: agent.transport.connected, 10.0):
        raise SystemExit("the agent could not reach the broker")
    x = np.load(STREAMS_FILE)["mixed_x"]
    hops: dict[str, list[float]] = {h: [] for h in HOPS}
    try:
        for i in range(n + 50):
            marks.clear()
            t0 = time.perf_counter()
            r = agent.infer(x[i % len(x)])
            t1 = time.perf_counter()
            if i < 50 or r.source != "cloud" or "answer" not in marks:
                continue  # warm-up, or no answer in time
            ms = 1000.0
            h = hub_ms[-1]
            hops["edge"].append((marks["edge1"] - marks["edge0"]) * ms)
            hops["publish"].append((marks["pub1"] - marks["pub0"]) * ms)
            hops["wire"].append((marks["answer"] - marks["pub1"]) * ms - h)
            hops["hub"].append(h)
            hops["wake"].append((wait_marks["woke"] - marks["answer"]) * ms)
            hops["finish"].append((t1 - wait_marks["woke"]) * ms)
            hops["total"].append((t1 - t0) * ms)
            time.sleep(0.002)  # one at a time, as a camera at a few hundred frames/s
    finally:
        agent.stop()
    return hops


def summary(hops: dict[str, list[float]]) -> dict[str, dict[str, float | None]]:
    return {h: {f"p{q}": percentile(v, q) for q in (50, 90, 99)} for h, v in hops.items() if v}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=500)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    tune_gil_switch_interval()  # as the agent's entry point does
    with work_folder(None, "ehi-hops-", False) as workdir, ProcessGroup() as group, \
            tempfile.TemporaryDirectory() as tmp:
        broker = start_broker(group, workdir, "mosquitto")
        port = free_port()
        start_hub(group, workdir, port=port, broker_port=broker.port,
                  log_path=workdir / "hub.log", env={"EHI_HUB_MQTT__PROTOCOL": "5"})
        hops = measure(broker.port, args.inputs, Path(tmp))
    table = summary(hops)
    out = {"machine": {"cpus": os.cpu_count(), "cpu": cpu_name()}, "inputs": len(hops["total"]),
           "hops_ms": table}
    print(f"{len(hops['total'])} offloads answered, one at a time ({cpu_name()})")
    print(f"{'hop':<9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    for h, s in table.items():
        print(f"{h:<9}{s['p50']:>9.3f}{s['p90']:>9.3f}{s['p99']:>9.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
