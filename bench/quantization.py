"""Which INT8 recipe keeps the digits edge model's answers on this CPU, on both backends.

    python bench/quantization.py [--json PATH]      (needs the `models` extra: onnx, sklearn)

Quantizes the bundle's own FP32 model (`model-fp32.onnx`, no training needed) with each recipe
(format, activation/weight types, per-channel, reduce_range), calibrated on the same 512
training images as the build, and runs each result on onnxruntime at every graph optimization
level and on OpenVINO. For each row: top-1 agreement with the recipe's reference (the QDQ graph
run as written, onnxruntime without graph optimizations: quantize and dequantize emulated in
float, the same on every CPU), accuracy on the mixed stream, and the offload rate at the
threshold that offloads 22% of the validation split on the reference. Prints a table and the
CPU's SIMD flags; `--json PATH` writes the rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.inference.cpu import cpu_flags, cpu_name
from fleet.inference.policy import HardExamplePolicy, softmax
from models import EDGE_BUNDLE, STREAMS_FILE
from models.build import CALIBRATION_SAMPLES, RECIPES, Recipe, _preprocess, quantize_int8
from models.digits import data
from models.digits.evaluate import OFFLOAD_BUDGET

LEVELS = ("DISABLE_ALL", "ENABLE_BASIC", "ENABLE_EXTENDED", "ENABLE_ALL")
POLICY = "entropy"


def ort_logits(model: Path, x: np.ndarray, level: str) -> np.ndarray:
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level}")
    o.log_severity_level = 3
    s = ort.InferenceSession(str(model), o, providers=["CPUExecutionProvider"])
    out: np.ndarray = s.run(None, {s.get_inputs()[0].name: x})[0]
    return out


def _ort_at(level: str, model: Path, x: np.ndarray) -> np.ndarray:
    return ort_logits(model, x, level)


def ov_logits(model: Path, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    c = ov.Core().compile_model(str(model), "CPU")
    out: np.ndarray = c(x)[c.output(0)]
    return out


def evaluate(recipes: dict[str, Recipe]) -> list[dict[str, Any]]:
    splits = data.load_splits()
    x_train, _ = data.training_set(splits)
    p_train = _preprocess(x_train)
    calib = p_train[np.random.default_rng(0).choice(len(p_train), CALIBRATION_SAMPLES,
                                                    replace=False)]
    x_val, _ = data.validation_set(splits)
    pv = _preprocess(x_val)
    with np.load(STREAMS_FILE) as z:
        pm, ym = _preprocess(z["mixed_x"]), z["mixed_y"]
    pol = HardExamplePolicy(POLICY, 0.0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        fp32 = EDGE_BUNDLE / "model-fp32.onnx"
        fp32_acc = float((ort_logits(fp32, pm, "DISABLE_ALL").argmax(1) == ym).mean())
        for name, recipe in recipes.items():
            model = tmp / f"{name}.onnx"
            quantize_int8(fp32, model, calib, recipe)
            ref_val = softmax(ort_logits(model, pv, "DISABLE_ALL"))
            thr = float(np.quantile(pol.scores(ref_val), 1 - OFFLOAD_BUDGET))
            ref_mixed = ort_logits(model, pm, "DISABLE_ALL").argmax(1)
            runs: dict[str, Callable[[Path, np.ndarray], np.ndarray]] = {
                f"onnxruntime/{lv}": functools.partial(_ort_at, lv) for lv in LEVELS}
            runs["openvino"] = ov_logits
            for where, run in runs.items():
                try:
                    probs = softmax(run(model, pm))
                except Exception as exc:  # a runtime that cannot load the recipe: a row too
                    rows.append({"recipe": name, "run": where, "error": str(exc).split("\n")[0]})
                    continue
                rows.append({
                    "recipe": name, "run": where,
                    "agreement": round(float((probs.argmax(1) == ref_mixed).mean()), 4),
                    "accuracy_mixed": round(float((probs.argmax(1) == ym).mean()), 4),
                    "accuracy_fp32": round(fp32_acc, 4),
                    "offload_mixed": round(float((pol.scores(probs) > thr).mean()), 4),
                    "bytes": model.stat().st_size})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = evaluate(RECIPES)
    print(f"CPU: {cpu_name()}; flags: {' '.join(cpu_flags()) or '-'}")
    print(f"{'recipe':<22} {'run':<28} {'agree':>7} {'acc mixed':>9} {'offload':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['recipe']:<22} {r['run']:<28} does not load: {r['error'][:60]}")
            continue
        print(f"{r['recipe']:<22} {r['run']:<28} {r['agreement']:>7.2%} "
              f"{r['accuracy_mixed']:>9.2%} {r['offload_mixed']:>8.2%}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "cpu_flags": cpu_flags(),
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
