"""Accuracy against offload rate for every hard-example policy, on the clean, shifted and mixed
streams, with the edge-only and cloud-only baselines, and the AUROC of each policy's score for
"the edge answer is wrong".

    python bench/cascade.py [--backend onnxruntime] [--json PATH]

Runs the bundled models offline (no broker, no hub): the cascade's accuracy depends only on the
two models and the policy, and this sweeps what the live loop would do at each threshold.
The fitted threshold of each policy (from the bundle's manifest) is marked in the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.inference.engine import Engine
from fleet.inference.policy import CONFIDENCE_POLICIES, HardExamplePolicy
from models import CLOUD_BUNDLE, EDGE_BUNDLE, STREAMS, STREAMS_FILE
from models.digits.evaluate import auroc

# Offload rates at which the sweep reports accuracy (the threshold is the score quantile).
SWEEP_RATES = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.40, 0.50, 1.0)
RANDOM_SEED = 0


def operating_point(scores: np.ndarray, threshold: float, edge_ok: np.ndarray,
                    cloud_ok: np.ndarray) -> dict[str, float]:
    off = scores > threshold
    return {"threshold": float(threshold), "offload_rate": float(off.mean()),
            "accuracy": float(np.where(off, cloud_ok, edge_ok).mean())}


def sweep(scores: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray) -> list[dict[str, float]]:
    out = []
    for rate in SWEEP_RATES:
        # The threshold that offloads `rate` of the inputs: the (1 - rate) quantile of the score.
        thr = -1.0 if rate >= 1.0 else float(np.quantile(scores, 1.0 - rate, method="higher"))
        if rate == 0.0:
            thr = float(scores.max())
        out.append(operating_point(scores, thr, edge_ok, cloud_ok))
    return out


def run(backend: str) -> dict[str, Any]:
    edge = Engine.open(EDGE_BUNDLE, backend)
    cloud = Engine.open(CLOUD_BUNDLE, "onnxruntime")
    he = edge.manifest.hard_example
    fitted = dict(he.thresholds) if he else {}
    data = np.load(STREAMS_FILE)
    out: dict[str, Any] = {"backend": edge.backend.name, "edge_model": edge.manifest.ref,
                           "cloud_model": cloud.manifest.ref,
                           "recommended": he.policy if he else None, "streams": {}}
    for stream in STREAMS:
        x, y = data[f"{stream}_x"], data[f"{stream}_y"]
        probs = edge.predict_batch(x)
        edge_pred = probs.argmax(1)
        cloud_pred = cloud.predict_batch(x).argmax(1)
        edge_ok, cloud_ok = edge_pred == y, cloud_pred == y
        s: dict[str, Any] = {"samples": len(y), "edge_only": float(edge_ok.mean()),
                             "cloud_only": float(cloud_ok.mean()),
                             "oracle": float((edge_ok | cloud_ok).mean()), "policies": {}}
        for name in (*CONFIDENCE_POLICIES, "random"):
            pol = HardExamplePolicy(name, 0.0, seed=RANDOM_SEED)
            scores = pol.scores(probs)
            entry: dict[str, Any] = {"auroc": auroc(scores, ~edge_ok),
                                     "sweep": sweep(scores, edge_ok, cloud_ok)}
            if name in fitted:
                entry["fitted"] = operating_point(scores, fitted[name], edge_ok, cloud_ok)
            s["policies"][name] = entry
        out["streams"][stream] = s
    return out


def print_table(r: dict[str, Any]) -> None:
    print(f"edge {r['edge_model']} on {r['backend']}, cloud {r['cloud_model']}; "
          f"recommended policy: {r['recommended']}")
    for stream, s in r["streams"].items():
        gap = s["cloud_only"] - s["edge_only"]
        print(f"\n[{stream}] {s['samples']} inputs: edge-only {s['edge_only']:.2%}, "
              f"cloud-only {s['cloud_only']:.2%}, oracle {s['oracle']:.2%}")
        rates = "".join(f"{p['offload_rate']:>8.0%}" for p in s["policies"]["entropy"]["sweep"])
        print(f"  {'':<18}| accuracy at offload rate")
        print(f"  {'policy':<10}{'AUROC':>7} |{rates}")
        for name, e in s["policies"].items():
            accs = "".join(f"{p['accuracy']:>8.2%}" for p in e["sweep"])
            print(f"  {name:<10}{e['auroc']:>7.3f} |{accs}")
        for name, e in s["policies"].items():
            f = e.get("fitted")
            if f:
                rec = (f["accuracy"] - s["edge_only"]) / gap if gap > 0 else float("nan")
                print(f"  fitted {name:<9} threshold {f['threshold']:.3g}: offload "
                      f"{f['offload_rate']:.2%}, accuracy {f['accuracy']:.2%} "
                      f"({rec:.0%} of the gap)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino"])
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    r = run(args.backend)
    print_table(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
