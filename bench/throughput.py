"""Throughput mode, measured: concurrent clients on the agent's local API.

    python bench/throughput.py [BUNDLE] [--clients 4] [--seconds 20] [--rounds 5] [--json PATH]

Configurations, alternated round by round in one run:
- ort-latency:  onnxruntime, each request at once on its own thread (the default);
- ort-batch:    onnxruntime, requests gathered into batches (max 8, wait ≤ 2 ms);
- ov-latency:   OpenVINO, LATENCY hint (one infer request);
- ov-throughput: OpenVINO, THROUGHPUT hint (a pool of parallel infer requests);
- ov-batch:     OpenVINO, LATENCY hint, batch mode.
Default bundle: the MobileNet-class INT8 perf bundle (built into the cache if missing).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.agent import Agent
from edge_agent.bench import _offline, forget_outbox, sample_inputs
from edge_agent.config import AgentSettings
from edge_agent.local_api import LocalApi
from fleet.inference.backends import BackendOptions
from fleet.inference.engine import Engine
from fleet.transport.tuning import tune_gil_switch_interval

CONFIGS: dict[str, dict[str, Any]] = {
    "ort-latency": {"backend": "onnxruntime", "mode": "latency", "hint": "LATENCY"},
    "ort-batch": {"backend": "onnxruntime", "mode": "batch", "hint": "LATENCY"},
    "ov-latency": {"backend": "openvino", "mode": "latency", "hint": "LATENCY"},
    "ov-throughput": {"backend": "openvino", "mode": "latency", "hint": "THROUGHPUT"},
    "ov-batch": {"backend": "openvino", "mode": "batch", "hint": "LATENCY"},
}


class Target:
    def __init__(self, bundle: Path, cfg: dict[str, Any], threads: int) -> None:
        opts = BackendOptions(threads=threads, openvino_hint=cfg["hint"])
        engine = Engine.open(bundle, cfg["backend"], threads, options=opts)
        self.tmp = tempfile.TemporaryDirectory()
        settings = AgentSettings(device_id="tp", bundle=bundle, telemetry_interval_s=3600,
                                 threads=threads, local_api={"port": -1},
                                 results={"outbox_dir": Path(self.tmp.name) / "outbox"},
                                 throughput={"mode": cfg["mode"], "max_batch": 8,
                                             "max_wait_ms": 2.0})
        self.agent = Agent(settings, engine=engine, transport_factory=_offline)
        self.agent.start()
        self.api = LocalApi(self.agent, "127.0.0.1", 0, 1 << 30)
        self.api.start()
        one = sample_inputs(engine, 1)[0]
        self.body = one.tobytes()
        self.headers = {"Content-Type": "application/octet-stream", "X-EHI-Dtype": one.dtype.name,
                        "X-EHI-Shape": ",".join(map(str, one.shape))}
        self.done = 0
        self.seconds = 0.0
        self.latencies: list[float] = []

    def round(self, clients: int, seconds: float) -> None:
        end = time.perf_counter() + seconds
        lat: list[list[float]] = [[] for _ in range(clients)]

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.api.port, timeout=30)
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                conn.request("POST", "/v1/infer", self.body, self.headers)
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    lat[i].append(time.perf_counter() - t0)
            conn.close()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.seconds += time.perf_counter() - t0
        for lt in lat:
            self.latencies += lt
            self.done += len(lt)
        forget_outbox(self.agent)

    def close(self) -> None:
        self.api.stop()
        self.agent.stop()
        self.tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, nargs="?")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0, help="per configuration")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    tune_gil_switch_interval()
    bundle = args.bundle
    if bundle is None:
        from models import perf

        bundle = perf.ensure()["int8"]
    names = [n for n in args.configs.split(",") if n]
    targets = {n: Target(bundle, CONFIGS[n], args.threads) for n in names}
    try:
        for t in targets.values():
            t.round(args.clients, 0.3)  # warm-up
            t.done, t.seconds, t.latencies = 0, 0.0, []
        for _ in range(args.rounds):
            for t in targets.values():
                t.round(args.clients, args.seconds / args.rounds)
    finally:
        for t in targets.values():
            t.close()
    rows = [{"config": n, **CONFIGS[n], "clients": args.clients,
             "ips": round(t.done / t.seconds, 1),
             "p50_ms": round(float(np.percentile(t.latencies, 50)) * 1e3, 2),
             "p99_ms": round(float(np.percentile(t.latencies, 99)) * 1e3, 2)}
            for n, t in targets.items()]
    print(f"{bundle.name}: {args.clients} concurrent clients on the local API, "
          f"{args.threads} inference thread(s)")
    print(f"{'config':<15}{'inputs/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for r in rows:
        print(f"{r['config']:<15}{r['ips']:>10.1f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
