"""The MobileNet-class perf bundle pipeline (built narrow here, for speed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet.contract.bundle import load_bundle
from fleet.inference.engine import Engine
from fleet.inference.preprocess import Preprocessor


@pytest.mark.slow
def test_perf_bundles_build_and_both_backends_agree(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from models import perf

    dirs = perf.build(tmp_path, width=0.25)
    assert set(dirs) == {"fp32", "int8"}
    for precision, d in dirs.items():
        m = load_bundle(d).manifest
        assert m.raw_input.shape == (224, 224, 3) and m.raw_input.dtype == "uint8"
        assert m.model_file().precision == precision
    x = np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    probs = {}
    for precision, d in dirs.items():
        for backend in ("onnxruntime", "openvino"):
            probs[precision, backend] = Engine.open(d, backend).predict_batch(x)
    # OpenVINO runs these bundles' preprocessing inside the compiled model (uint8 HWC input).
    assert Engine.open(dirs["int8"], "openvino").backend.takes_raw
    assert not Engine.open(dirs["int8"], "onnxruntime").backend.takes_raw
    for precision in ("fp32", "int8"):
        a, b = probs[precision, "onnxruntime"], probs[precision, "openvino"]
        assert a.shape == (4, 1000)
        assert np.abs(a - b).max() < 0.05, precision
    # INT8 follows FP32 (random weights: compare the distributions, not labels).
    assert np.abs(probs["fp32", "onnxruntime"] - probs["int8", "onnxruntime"]).max() < 0.05
    # Float inputs to the uint8 bundle: clipped and rounded on the fused path, like numpy's.
    ov_eng = Engine.open(dirs["int8"], "openvino")
    odd = x[:1].astype(np.float32)
    odd[0, :10] = 300.0
    odd[0, 10:20] = -5.0
    fed = ov_eng._model_input(odd)
    assert fed.dtype == np.uint8
    assert (fed[0, :10] == 255).all() and (fed[0, 10:20] == 0).all()
    np.testing.assert_array_equal(fed[0, 20:], x[0, 20:])
    # The HWC uint8 -> NCHW float preprocessing.
    pre = Preprocessor.for_manifest(load_bundle(dirs["int8"]).manifest)
    out = pre(x)
    assert out.shape == (4, 3, 224, 224) and out.flags.c_contiguous
    np.testing.assert_allclose(out, x.transpose(0, 3, 1, 2) / 255.0, atol=1e-6)
    np.testing.assert_allclose(pre(x, reuse=True), out)
