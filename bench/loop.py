"""The whole loop, measured: `fleet demo` repeated under several configurations, alternating
them run by run so they share the machine's noise, with medians over the repeats.

    python bench/loop.py [--repeats 3] [--devices 4] [--samples N] [--json PATH]

Configurations:
- mosquitto:          the demo's defaults with Mosquitto;
- mosquitto-gil-5ms:  the same with CPython's default 5 ms GIL switch interval in every process
                      (the daemons use 0.5 ms; this shows why);
- mosquitto-no-inline: the same with the hub's inline fast path off (every offload goes
                      through the batcher's worker thread);
- embedded:           the pure-Python embedded broker (a laptop without Mosquitto).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.lab.brokers import mosquitto_path
from fleet.lab.demo import DemoOptions, gap_recovered, run_demo

CONFIGS: dict[str, dict[str, Any]] = {
    "mosquitto": {"broker": "mosquitto", "env": {}},
    "mosquitto-gil-5ms": {"broker": "mosquitto", "env": {"EHI_GIL_SWITCH_INTERVAL_S": "0.005"}},
    "mosquitto-no-inline": {"broker": "mosquitto", "env": {"EHI_HUB_INLINE_MAX_MS": "0"}},
    "embedded": {"broker": "embedded", "env": {}},
}
METRICS = ("hybrid_accuracy", "offload_rate", "local_p50", "local_p99", "offload_p50",
           "offload_p99", "wire_per_input", "seconds")


def flat(r: dict[str, Any]) -> dict[str, float]:
    return {"hybrid_accuracy": r["hybrid_accuracy"], "offload_rate": r["offload_rate"],
            "edge_accuracy": r["edge_accuracy"], "cloud_accuracy": r["cloud_accuracy"],
            "gap_recovered": gap_recovered(r) or 0.0,
            "bytes_ratio": r["bytes_offloaded"] / r["bytes_cloud_only"],
            **r["latency_ms"], "seconds": r["seconds"],
            "delivered": float(r["results_at_hub"] == r["results_produced"]),
            # Bytes on the agents' broker links per input (the kernel's count; -1: not counted).
            "wire_per_input": float(r["wire_bytes"]["per_input"] or -1),
            "wire_cloud_only_per_input": float(r["wire_bytes"]["cloud_only_per_input"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--samples", type=int)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    if not mosquitto_path():
        names = [n for n in names if CONFIGS[n]["broker"] != "mosquitto"]
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for name in names:
            cfg = CONFIGS[name]
            saved = {k: os.environ.get(k) for k in cfg["env"]}
            os.environ.update(cfg["env"])
            try:
                # The inference loop alone, as in the earlier figures: no model update mid-run.
                r = run_demo(DemoOptions(devices=args.devices, samples=args.samples,
                                         broker=cfg["broker"], update=False))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            runs[name].append(flat(r))
            lat = r["latency_ms"]
            print(f"run {rep + 1}/{args.repeats} {name}: offload p50 {lat['offload_p50']}"
                  f" p99 {lat['offload_p99']} ms, {r['seconds']} s", file=sys.stderr)
    medians = {n: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for n, rs in runs.items()}
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "processor": platform.processor() or platform.machine()},
           "repeats": args.repeats, "devices": args.devices, "medians": medians, "runs": runs}
    hdr = f"{'configuration':<21}" + "".join(f"{m:>16}" for m in METRICS) + f"{'all delivered':>15}"
    print(f"medians of {args.repeats} runs, {args.devices} agents "
          f"({out['machine']['cpus']} cpus)")
    print(hdr)
    for n, m in medians.items():
        cells = "".join(f"{m[k]:>16.4f}" if k in ("hybrid_accuracy", "offload_rate")
                        else f"{m[k]:>16.3f}" for k in METRICS)
        print(f"{n:<21}{cells}{'yes' if min(x['delivered'] for x in runs[n]) else 'NO':>15}")
    if "mosquitto" in medians and "mosquitto-gil-5ms" in medians:
        a, b = medians["mosquitto"], medians["mosquitto-gil-5ms"]
        ratio = b["offload_p99"] / a["offload_p99"]
        print(f"offload p99, 5 ms GIL interval / 0.5 ms: {ratio:.2f}x")
    if "mosquitto" in medians and "mosquitto-no-inline" in medians:
        a, b = medians["mosquitto"], medians["mosquitto-no-inline"]
        print(f"offload p50, hub inline path off / on: {b['offload_p50'] / a['offload_p50']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
