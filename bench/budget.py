"""The offload budget under drift: a fixed threshold against the controller, through a real
broker and hub.

    python bench/budget.py [--segment 400] [--target 0.2] [--broker auto] [--json PATH]

The stream goes clean -> shifted -> clean (`--segment` inputs each, drawn from the test
streams with a seeded shuffle). One agent (in this process, on its default backend) answers it
twice, input by input, through a broker and a `cloud-hub serve` of its own: once with
`offload.mode = "threshold"` (the threshold it calibrated for the bundle's budget) and once with
`offload.mode = "budget"` at `--target`. Per window of 100 inputs: the share offloaded by each;
then the hybrid accuracy of each, the bytes offloaded, and how many inputs after each switch
the controller needed before every later window of that segment stayed within 3 points of the
target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from fleet.inference.cpu import cpu_flags, cpu_name
from fleet.lab.brokers import start_broker
from fleet.lab.processes import ProcessGroup, start_hub, work_folder
from fleet.transport.ports import free_port
from models import EDGE_BUNDLE, STREAMS_FILE

WINDOW = 100
TOLERANCE_PTS = 3.0
CONNECT_S = 20.0


def make_stream(segment: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """clean -> shifted -> clean, `segment` inputs each (test images, reshuffled per segment)."""
    rng = np.random.default_rng(seed)
    xs, ys, names = [], [], []
    with np.load(STREAMS_FILE) as z:
        for name in ("clean", "shifted", "clean"):
            x, y = z[f"{name}_x"], z[f"{name}_y"]
            reps = -(-segment // len(x))
            idx = np.concatenate([rng.permutation(len(x)) for _ in range(reps)])[:segment]
            xs.append(x[idx])
            ys.append(y[idx])
            names += [name] * segment
    return np.concatenate(xs), np.concatenate(ys), names


def run_agent(mode: str, target: float, x: np.ndarray, broker_port: int, workdir: Path
              ) -> dict[str, Any]:
    s = AgentSettings(device_id=f"budget-{mode}", bundle=EDGE_BUNDLE, telemetry_interval_s=3600,
                      mqtt={"port": broker_port}, local_api={"port": -1},
                      results={"store": "memory"},
                      offload={"mode": mode, "target": target, "deadline_ms": 1000.0},
                      cache_dir=workdir / "cache")
    agent = Agent(s)
    agent.start(wait_connected_s=CONNECT_S)
    try:
        answers = [agent.infer(xi) for xi in x]
        agent.drain(30.0)
        state = agent.offload_state()
        backend = agent.engine.backend.name
    finally:
        agent.stop()
    from fleet.contract import protocol as p

    one = len(p.Offload(id="0" * 32, model=answers[0].model, input=np.asarray(x[0]),
                        deadline_ms=1000.0, sent_at=time.time(), edge_label=0,
                        edge_score=0.0).encode())
    return {"answers": answers, "state": state, "backend": backend, "offload_bytes": one}


def settle(rates: list[float], names: list[str], target: float) -> tuple[int, float]:
    """Inputs after each switch until every later window of the segment is within tolerance,
    and the largest error (points) over the windows after settling."""
    per_window = [names[i * WINDOW] for i in range(len(rates))]
    worst_settle, worst_err = 0, 0.0
    start = 0
    while start < len(rates):
        end = start
        while end < len(rates) and per_window[end] == per_window[start]:
            end += 1
        seg = rates[start:end]
        k = next((i for i in range(len(seg))
                  if all(abs(r - target) * 100 <= TOLERANCE_PTS for r in seg[i:])), len(seg))
        if start > 0:
            worst_settle = max(worst_settle, k * WINDOW)
        after = seg[k:] if start > 0 else seg
        if after:
            worst_err = max(worst_err, max(abs(r - target) * 100 for r in after))
        start = end
    return worst_settle, round(worst_err, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--segment", type=int, default=400, help="inputs per segment (x3)")
    ap.add_argument("--target", type=float, default=0.2)
    ap.add_argument("--broker", default="auto", help="auto, mosquitto or embedded")
    ap.add_argument("--seed", type=int, default=0, help="the stream's shuffle")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.segment % WINDOW:
        ap.error(f"--segment must be a multiple of {WINDOW}")
    x, y, names = make_stream(args.segment, args.seed)
    runs: dict[str, dict[str, Any]] = {}
    with work_folder(None, "ehi-budget-") as workdir, ProcessGroup() as group:
        broker = start_broker(group, workdir, args.broker)
        port = free_port()
        start_hub(group, workdir, port=port, broker_port=broker.port,
                  log_path=workdir / "hub.log",
                  env={"EHI_HUB_MQTT__PROTOCOL": broker.protocol})
        for mode in ("threshold", "budget"):
            runs[mode] = run_agent(mode, args.target, x, broker.port, workdir)
    rates: dict[str, list[float]] = {}
    out: dict[str, Any] = {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "target": args.target,
                           "segment": args.segment, "seed": args.seed, "broker": broker.kind}
    for mode, r in runs.items():
        ans = r["answers"]
        hard = np.array([a.offloaded for a in ans])
        rates[mode] = [float(hard[i:i + WINDOW].mean()) for i in range(0, len(hard), WINDOW)]
        pred = np.array([a.label for a in ans])
        out[f"hybrid_accuracy_{'static' if mode == 'threshold' else 'budget'}"] = round(
            float((pred == y).mean()), 4)
        out[f"offload_{mode}"] = round(float(hard.mean()), 4)
        out[f"bytes_offloaded_{mode}"] = int(hard.sum()) * r["offload_bytes"]
        out[f"degraded_{mode}"] = sum(a.degraded for a in ans)
        out[f"final_state_{mode}"] = r["state"]
        out["backend"] = r["backend"]
    out["windows"] = [{"inputs": (i + 1) * WINDOW, "stream": names[i * WINDOW],
                       "offload_static": round(rates["threshold"][i], 4),
                       "offload_budget": round(rates["budget"][i], 4)}
                      for i in range(len(rates["budget"]))]
    out["settle_inputs"], out["max_error_after_settle_pts"] = settle(rates["budget"], names,
                                                                     args.target)
    _, out["max_error_static_pts"] = settle(rates["threshold"], names, args.target)
    print(f"CPU {out['cpu']} ({' '.join(out['cpu_flags'])}); backend {out['backend']}, "
          f"broker {out['broker']}; target {args.target:.0%}")
    print(f"{'inputs':>7} {'stream':<8} {'fixed threshold':>16} {'budget':>8}")
    for w in out["windows"]:
        print(f"{w['inputs']:>7} {w['stream']:<8} {w['offload_static']:>16.0%} "
              f"{w['offload_budget']:>8.0%}")
    print(f"hybrid accuracy: fixed {out['hybrid_accuracy_static']:.2%}, budget "
          f"{out['hybrid_accuracy_budget']:.2%}; offloaded: fixed {out['offload_threshold']:.1%}"
          f" ({out['bytes_offloaded_threshold']:,} B), budget {out['offload_budget']:.1%} "
          f"({out['bytes_offloaded_budget']:,} B)")
    print(f"settle after a switch: {out['settle_inputs']} inputs; largest error after settling "
          f"{out['max_error_after_settle_pts']} points (fixed threshold: "
          f"{out['max_error_static_pts']}); drift at the end "
          f"{out['final_state_budget'].get('drift')}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
