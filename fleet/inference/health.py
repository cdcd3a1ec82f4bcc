"""The health check a bundle must pass before an agent switches to it, and how a build records
what it checks (the golden input and output, the tolerance and the latency budget).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fleet.contract.bundle import MANIFEST_NAME, HealthSpec, Manifest, file_entry, write_manifest
from fleet.inference.engine import Engine
from fleet.inference.errors import HealthCheckFailed, InferenceError

GOLDEN_FILE = "golden.npz"
# Single-input runs timed for the latency figure (after one warm-up); the median is compared.
LATENCY_RUNS = 20


@dataclass(frozen=True, slots=True)
class HealthReport:
    max_abs_diff: float
    latency_ms: float


def check_health(engine: Engine, runs: int = LATENCY_RUNS) -> HealthReport:
    """Run the golden input through `engine` (already loaded on the backend it will serve on).

    Raises HealthCheckFailed if the manifest has no health check, the output is off
    by more than the tolerance, or the median latency exceeds the budget."""
    m = engine.manifest
    if m.health is None:
        raise HealthCheckFailed(f"bundle {m.ref} has no health check")
    spec = m.health
    try:
        with np.load(engine.bundle.root / spec.golden, allow_pickle=False) as z:
            x, want = z["input"], z["output"]
        got = engine.predict_batch(x)
    except (OSError, KeyError, ValueError, InferenceError) as exc:
        raise HealthCheckFailed(f"bundle {m.ref}: golden input failed: {exc}") from None
    if got.shape != want.shape:
        raise HealthCheckFailed(f"bundle {m.ref}: golden output has shape "
                                     f"{list(got.shape)}, expected {list(want.shape)}")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    if not diff <= spec.atol:  # also catches NaN
        raise HealthCheckFailed(f"bundle {m.ref}: golden output differs by {diff:.4g} "
                                     f"(tolerance {spec.atol:g})")
    one = x[:1]
    engine.predict_batch(one)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        engine.predict_batch(one)
        times.append((time.perf_counter() - t0) * 1000.0)
    lat = statistics.median(times)
    if lat > spec.latency_budget_ms:
        raise HealthCheckFailed(f"bundle {m.ref}: median latency {lat:.2f} ms is over "
                                     f"its budget of {spec.latency_budget_ms:g} ms")
    return HealthReport(diff, lat)


def record_golden(bundle_dir: Path, golden_input: np.ndarray, atol: float,
                  latency_budget_ms: float, backend: str = "onnxruntime") -> Manifest:
    """Add a golden input, the bundle's own output on it and the health limits to a bundle's
    manifest (which then needs signing again). Returns the new manifest."""
    engine = Engine.open(bundle_dir, backend)
    try:
        out = engine.predict_batch(golden_input)
    finally:
        engine.close()
    np.savez(bundle_dir / GOLDEN_FILE, input=golden_input, output=out)
    raw = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    raw.pop("signatures", None)
    m = Manifest.from_dict({**raw, "health": None})
    files = tuple(f for f in m.files if f.path != GOLDEN_FILE)
    m = replace(m, files=(*files, file_entry(bundle_dir, GOLDEN_FILE, "golden")),
                health=HealthSpec(GOLDEN_FILE, atol, latency_budget_ms))
    write_manifest(bundle_dir, m)
    return m
