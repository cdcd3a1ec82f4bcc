"""The perf bundles: a MobileNet-class 224x224x3 classifier in FP32 and INT8, built on demand.

    python -m models.perf [--out DIR]      (needs the `models` extra: torch, onnx)

Weights are random (seeded): they do not change speed, and nothing is downloaded. The bundles go
to a cache folder outside git (default: ~/.cache/edge-hybrid-inference/perf-bundles). The
architecture is MobileNetV2 (width 1.0: about 0.6 GFLOPs, 3.5 M parameters) written out with
standard operators; INT8 is static QDQ (uint8 activations, int8 weights), calibrated on seeded
random images. Weights are quantized per tensor by default: onnxruntime's per-channel depthwise
INT8 kernels were 15% slower here (docs/benchmarks.md); `--per-channel` builds the variant that
real weights would want for accuracy. The digits bundles remain the accuracy benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fleet.contract.bundle import HardExampleSpec, Manifest, TensorSpec, file_entry, write_manifest
from fleet.contract.signing import sign_bundle
from fleet.inference.backends.base import BackendOptions
from fleet.inference.backends.onnxruntime_backend import OnnxRuntimeBackend
from fleet.inference.fidelity import record_fidelity
from fleet.inference.health import record_golden
from models import DEMO_KEY

log = logging.getLogger("models.perf")

SEED = 7
CALIBRATION_IMAGES = 16
OPSET = 18
LIFETIME = timedelta(days=3 * 365)
# Health check of these bundles: one random image; INT8 kernels differ between runtimes more
# than FP32 ones; 2-7 ms per image here, the budget leaves room for small devices.
GOLDEN_ATOL = 0.05
LATENCY_BUDGET_MS = 500.0
RAW_INPUT = TensorSpec("image", "uint8", (224, 224, 3))
# ImageNet-style: scale to [0, 1], then HWC -> CHW.
PREPROCESSING: list[dict[str, Any]] = [{"type": "minmax", "min": 0, "max": 255},
                                       {"type": "transpose", "axes": [2, 0, 1]}]
PRECISIONS = ("fp32", "int8")
# The fidelity set: random images (the weights are random too, so any input is "like the
# stream"); 32 keep the set at 4.8 MB. Random weights leave many images with near-tied top
# classes, which correct kernels may order differently: the floor allows one in 32.
FIDELITY_IMAGES = 32
FIDELITY_MIN_AGREEMENT = 0.96


def default_out() -> Path:
    from fleet.inference.backends.base import default_cache_dir

    return default_cache_dir() / "perf-bundles"


def bundle_dirs(out: Path | None = None) -> dict[str, Path]:
    root = out or default_out()
    return {p: root / f"mobilenet-perf-{p}" for p in PRECISIONS}


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0) -> Any:
    import torch
    from torch import nn

    def cbr(cin: int, cout: int, k: int, s: int, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6())

    class Inverted(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            layers: list[nn.Module] = [] if expand == 1 else [cbr(cin, hidden, 1, 1)]
            layers += [cbr(hidden, hidden, 3, stride, groups=hidden),
                       nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.block(x) if self.residual else self.block(x)

    def ch(c: int) -> int:
        return max(8, int(c * width + 4) // 8 * 8)

    # (expansion, channels, repeats, first stride) of MobileNetV2.
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1)]
    layers: list[nn.Module] = [cbr(3, ch(32), 3, 2)]
    cin = ch(32)
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(Inverted(cin, ch(c), s if i == 0 else 1, t))
            cin = ch(c)
    layers.append(cbr(cin, 1280, 1, 1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(1280, num_classes))


def build(out: Path | None = None, width: float = 1.0,
          per_channel: bool = False) -> dict[str, Path]:
    import torch

    from models.build import RECIPES, REFERENCE_TEXT, export_onnx, quantize_int8

    torch.manual_seed(SEED)
    model = mobilenet_v2(width=width).eval()
    # Random weights leave BatchNorm statistics at their defaults; a few forward passes in
    # training mode give activations realistic ranges for INT8 calibration.
    rng = np.random.default_rng(SEED)
    with torch.no_grad():
        model.train()
        for _ in range(4):
            model(torch.from_numpy(rng.uniform(0, 1, (8, 3, 224, 224)).astype(np.float32)))
        model.eval()
    dirs = bundle_dirs(out)
    now = datetime.now(UTC).replace(microsecond=0)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        export_onnx(model, tmp / "fp32.onnx", (3, 224, 224))
        calib = rng.uniform(0, 1, (CALIBRATION_IMAGES, 3, 224, 224)).astype(np.float32)
        recipe = "u8s8-pc-reduce" if per_channel else "u8s8-pt-reduce"
        quantize_int8(tmp / "fp32.onnx", tmp / "int8.onnx", calib, RECIPES[recipe])
        fidelity_x = rng.integers(0, 256, (FIDELITY_IMAGES, *RAW_INPUT.shape)).astype(
            RAW_INPUT.dtype)
        for precision, d in dirs.items():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            shutil.copy(tmp / f"{precision}.onnx", d / "model.onnx")
            m = Manifest(
                name=f"mobilenet-perf-{precision}", version=1, task="classification",
                labels=tuple(f"class-{i}" for i in range(1000)), raw_input=RAW_INPUT,
                inputs=(TensorSpec("input", "float32", (-1, 3, 224, 224)),),
                outputs=(TensorSpec("logits", "float32", (-1, 1000)),),
                preprocessing=tuple(PREPROCESSING),
                hard_example=HardExampleSpec("max_prob", 0.5, {}, "not fitted: random weights"),
                runtimes=("onnxruntime", "openvino"),
                files=(file_entry(d, "model.onnx", "model", precision),),
                expires=now + LIFETIME,
                metrics={"purpose": "speed only: random weights", "width": width,
                         "quantization": ("none" if precision == "fp32" else
                                          f"static QDQ, recipe {recipe}"),
                         "built": now.isoformat()},
                extra={})
            write_manifest(d, m)
            record_golden(d, rng.integers(0, 256, (1, *RAW_INPUT.shape)).astype(
                RAW_INPUT.dtype), GOLDEN_ATOL, LATENCY_BUDGET_MS)
            ref = OnnxRuntimeBackend(d / "model.onnx", BackendOptions(ort_optimization="disabled"))
            try:
                record_fidelity(d, fidelity_x, None, FIDELITY_MIN_AGREEMENT, None, ref,
                                REFERENCE_TEXT)
            finally:
                ref.close()
            sign_bundle(d, DEMO_KEY)  # the demo key: see models/__init__.py
    return dirs


def ensure(out: Path | None = None) -> dict[str, Path]:
    """The perf bundles, built if they are not in the cache yet."""
    dirs = bundle_dirs(out)
    if all((d / "manifest.json").is_file()
           and "fidelity" in json.loads((d / "manifest.json").read_text())
           for d in dirs.values()):
        return dirs
    return build(out)  # missing, or built before bundles carried a fidelity set


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.perf", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"default: {default_out()}")
    ap.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
    ap.add_argument("--per-channel", action="store_true", help="per-channel INT8 weights")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "onnxruntime", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for precision, d in build(args.out, args.width, args.per_channel).items():
        print(f"{precision}: {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
