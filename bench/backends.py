"""The backends' tuning choices, measured: single-stream latency of one model under each setting.

    python bench/backends.py [BUNDLE] [--rounds 5] [--calls 30] [--json PATH]

onnxruntime: graph optimization level (disabled, basic, extended, all) × intra-op threads (1, 2).
OpenVINO: performance hint (LATENCY, THROUGHPUT) × inference threads (1, 2).
Each configuration is its own session on the same preprocessed input; configurations are
alternated round by round and the median call time is reported.
Default bundle: the MobileNet-class INT8 perf bundle (built into the cache if missing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.bench import sample_inputs
from fleet.contract.bundle import load_bundle
from fleet.inference.engine import Engine


def ort_runner(model: Path, x: np.ndarray, level: str, threads: int) -> Callable[[], object]:
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level}")
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    s = ort.InferenceSession(str(model), o, providers=["CPUExecutionProvider"])
    feed = {s.get_inputs()[0].name: x}
    return lambda: s.run(None, feed)


def ov_runner(model: Path, x: np.ndarray, hint: str, threads: int) -> Callable[[], object]:
    import openvino as ov

    c = ov.Core().compile_model(str(model), "CPU", {"PERFORMANCE_HINT": hint,
                                                    "INFERENCE_NUM_THREADS": threads})
    r = c.create_infer_request()
    return lambda: r.infer({0: x}, share_inputs=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, nargs="?")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    bundle = args.bundle
    if bundle is None:
        from models import perf

        bundle = perf.ensure()["int8"]
    b = load_bundle(bundle)
    eng = Engine.open(bundle, "onnxruntime")
    x = eng.preprocess(sample_inputs(eng, 1))
    eng.close()
    configs: dict[str, Callable[[], object]] = {}
    for level in ("DISABLE_ALL", "ENABLE_BASIC", "ENABLE_EXTENDED", "ENABLE_ALL"):
        for t in (1, 2):
            configs[f"onnxruntime {level.lower()} threads={t}"] = ort_runner(b.model_path, x,
                                                                              level, t)
    for hint in ("LATENCY", "THROUGHPUT"):
        for t in (1, 2):
            configs[f"openvino {hint.lower()} threads={t}"] = ov_runner(b.model_path, x, hint, t)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for fn in configs.values():
        for _ in range(5):
            fn()
    for _ in range(args.rounds):
        for k, fn in configs.items():
            for _ in range(args.calls):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    rows: list[dict[str, Any]] = [
        {"config": k, "p50_us": round(float(np.median(v)) * 1e6, 1),
         "p99_us": round(float(np.percentile(v, 99)) * 1e6, 1)} for k, v in times.items()]
    print(f"{b.manifest.ref}: one input at a time, medians of {args.rounds} x {args.calls} calls")
    print(f"{'configuration':<42}{'p50 us':>10}{'p99 us':>10}")
    for r in rows:
        print(f"{r['config']:<42}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
