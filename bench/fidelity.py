"""Does every bundle keep its promise on this CPU? Every bundle x backend x graph optimization.

    python bench/fidelity.py [--no-perf] [--json PATH]

For the digits edge and cloud bundles and the MobileNet-class perf bundles (built into the cache
if missing; `--no-perf` skips them), on onnxruntime at each graph optimization level and on
OpenVINO: the fidelity check the agent runs (top-1 agreement with the bundle's reference
outputs on its fidelity set, and whether it passes the floor), accuracy on each digits stream
against the manifest's, and the offload rate on the mixed stream at the manifest's threshold
and at the threshold the device calibrates on the fidelity set, against the bundle's budget.

The summary keys (`worst_*`) are taken over the rows the agent would serve: its own
configuration (onnxruntime with all optimizations, OpenVINO) where the check passes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.contract.bundle import load_bundle
from fleet.inference.backends import open_backend
from fleet.inference.backends.base import BackendOptions
from fleet.inference.cpu import cpu_flags, cpu_name
from fleet.inference.engine import Engine
from fleet.inference.fidelity import check as fidelity_check
from fleet.inference.policy import HardExamplePolicy
from models import CLOUD_BUNDLE, EDGE_BUNDLE, STREAMS, STREAMS_FILE

LEVELS = ("disabled", "basic", "extended", "all")
SERVED = {("onnxruntime", "all"), ("openvino", "-")}


def row(root: Path, backend: str, level: str, streams: dict[str, np.ndarray] | None
        ) -> dict[str, Any]:
    b = load_bundle(root)
    m = b.manifest
    opts = BackendOptions(ort_optimization=level if backend == "onnxruntime" else "all",  # type: ignore[arg-type]
                          preprocessing=m.preprocessing, raw_dtype=m.raw_input.dtype)
    be = open_backend(backend, b.model_path, opts)
    try:
        he = m.hard_example
        pol = HardExamplePolicy(he.policy, he.threshold) if he else None
        report, _ = fidelity_check(b, be, pol)
        r: dict[str, Any] = {"bundle": m.ref, "backend": backend, "level": level,
                             "served": (backend, level) in SERVED,
                             "agreement": round(report.agreement, 4),
                             "min_agreement": report.min_agreement, "faithful": report.faithful,
                             "fidelity_accuracy": report.accuracy}
        if streams is None:
            return r
        eng = Engine(b, be, pol or HardExamplePolicy("max_prob", 0.5))
        acc = m.metrics.get("accuracy", {})
        for s in STREAMS:
            probs = eng.predict_batch(streams[f"{s}_x"])
            r[f"accuracy_{s}"] = round(float((probs.argmax(1) == streams[f"{s}_y"]).mean()), 4)
            if s in acc:
                r[f"accuracy_drop_{s}_pts"] = round((acc[s] - r[f"accuracy_{s}"]) * 100, 2)
            if s == "mixed" and pol is not None and report.calibrated_threshold is not None:
                scores = pol.scores(probs)
                r["budget"] = report.budget
                r["offload_manifest_threshold"] = round(float((scores > pol.threshold).mean()), 4)
                r["offload_calibrated"] = round(
                    float((scores > report.calibrated_threshold).mean()), 4)
                r["offload_error_pts"] = round(
                    abs(r["offload_calibrated"] - (report.budget or 0)) * 100, 2)
        return r
    finally:
        be.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-perf", action="store_true", help="skip the MobileNet-class bundles")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with np.load(STREAMS_FILE) as z:
        streams = {k: z[k] for k in z.files}
    bundles: list[tuple[Path, dict[str, np.ndarray] | None]] = [(EDGE_BUNDLE, streams),
                                                                  (CLOUD_BUNDLE, streams)]
    if not args.no_perf:
        from models.perf import ensure

        bundles += [(d, None) for d in ensure().values()]
    rows = []
    for root, st in bundles:
        for backend in ("onnxruntime", "openvino"):
            for level in (LEVELS if backend == "onnxruntime" else ("-",)):
                rows.append(row(root, backend, level, st))
    served = [r for r in rows if r["served"] and r["faithful"]]
    drops = [v for r in served for k, v in r.items() if k.startswith("accuracy_drop_")]
    errs = [r["offload_error_pts"] for r in served if "offload_error_pts" in r]
    out: dict[str, Any] = {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "rows": rows,
           "refused": [f"{r['bundle']} on {r['backend']}/{r['level']}" for r in rows
                       if r["served"] and not r["faithful"]],
           "worst_agreement": min((r["agreement"] for r in served), default=None),
           "worst_accuracy_drop_pts": max(drops, default=None),
           "worst_offload_error_pts": max(errs, default=None)}
    print(f"CPU {out['cpu']}; flags {' '.join(out['cpu_flags'])}")
    print(f"{'bundle':<24} {'backend/level':<22} {'agree':>7} {'ok':>3} {'acc clean':>9} "
          f"{'shifted':>8} {'mixed':>7} {'offload@manifest':>16} {'@calibrated':>11}")
    def pct(r: dict[str, Any], k: str) -> str:
        return "-" if r.get(k) is None else f"{r[k]:.2%}"

    for r in rows:
        print(f"{r['bundle']:<24} {r['backend'] + '/' + r['level']:<22} {r['agreement']:>7.2%} "
              f"{'yes' if r['faithful'] else 'NO':>3} {pct(r, 'accuracy_clean'):>9} "
              f"{pct(r, 'accuracy_shifted'):>8} {pct(r, 'accuracy_mixed'):>7} "
              f"{pct(r, 'offload_manifest_threshold'):>16} {pct(r, 'offload_calibrated'):>11}")
    print(f"over the rows the agent serves: worst agreement {out['worst_agreement']}, worst "
          f"accuracy drop {out['worst_accuracy_drop_pts']} points, worst calibrated offload "
          f"error {out['worst_offload_error_pts']} points; refused: {out['refused'] or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
