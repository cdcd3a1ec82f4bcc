"""Both real runtimes load the bundled models and agree on them."""

import numpy as np
import pytest

from fleet.contract.bundle import load_bundle
from fleet.inference.backends import available_backends, candidates, open_backend
from fleet.inference.engine import Engine
from fleet.inference.errors import BackendError
from fleet.inference.preprocess import Preprocessor
from models import CLOUD_BUNDLE, EDGE_BUNDLE, STREAMS_FILE


def test_both_backends_installed() -> None:
    assert available_backends() == ["onnxruntime", "openvino"]


@pytest.mark.parametrize("root", [EDGE_BUNDLE, CLOUD_BUNDLE], ids=["edge", "cloud"])
def test_backends_agree(root) -> None:
    bundle = load_bundle(root)
    x = np.load(STREAMS_FILE)["mixed_x"][:200]
    batch = Preprocessor.for_manifest(bundle.manifest)(x)
    ort_out = open_backend("onnxruntime", bundle.model_path).run(batch)
    ov_out = open_backend("openvino", bundle.model_path).run(batch)
    assert ort_out.shape == ov_out.shape == (200, 10)
    # INT8 kernels differ between runtimes by a quantization step or two on some logits:
    # compare the decisions, and bound the drift.
    agree = (ort_out.argmax(1) == ov_out.argmax(1)).mean()
    assert agree >= 0.99
    diff = np.abs(ort_out - ov_out)
    assert np.median(diff) <= 0.1
    assert diff.max() <= 1.5


def test_single_sample_path_matches_batch() -> None:
    for backend in ("onnxruntime", "openvino"):
        eng = Engine.open(EDGE_BUNDLE, backend)
        x = np.load(STREAMS_FILE)["clean_x"][:20]
        batch = eng.predict_batch(x).argmax(1)
        single = [eng.run(xi).label for xi in x]
        assert list(batch) == single


def test_engine_uses_the_manifest_recommendation() -> None:
    m = load_bundle(EDGE_BUNDLE).manifest
    assert m.hard_example is not None
    # Without the fidelity check there is no calibration: the manifest's thresholds.
    eng = Engine.open(EDGE_BUNDLE, fidelity="off")
    assert eng.policy.name == m.hard_example.policy and eng.threshold_source == "manifest"
    assert eng.policy.threshold == pytest.approx(m.hard_example.threshold)
    other = next(k for k in m.hard_example.thresholds if k != m.hard_example.policy)
    eng2 = Engine.open(EDGE_BUNDLE, policy=other, fidelity="off")
    assert eng2.policy.threshold == pytest.approx(m.hard_example.thresholds[other])
    # With it, the recommended policy at the threshold calibrated on this device.
    eng3 = Engine.open(EDGE_BUNDLE)
    assert eng3.policy.name == m.hard_example.policy and eng3.threshold_source == "calibrated"


def test_backend_errors_are_clear(tmp_path) -> None:
    with pytest.raises(BackendError, match="unknown backend"):
        candidates("tensorrt")
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"not a model")
    for name in ("onnxruntime", "openvino"):
        with pytest.raises(BackendError, match="could not load"):
            open_backend(name, bad)
    assert candidates("auto", ("openvino",)) == ["openvino"]


@pytest.mark.parametrize("steps, dtype, ok", [
    ((), "uint8", False),
    (({"type": "minmax", "min": 0, "max": 255},), "uint8", True),
    (({"type": "minmax", "min": 0, "max": 255}, {"type": "transpose", "axes": [2, 0, 1]}),
     "uint8", True),
    (({"type": "minmax", "min": 0, "max": 16},), "uint8", False),   # the clip would bite
    (({"type": "minmax", "min": 0, "max": 255},), "float32", False),
    (({"type": "minmax", "min": 0, "max": 255}, {"type": "transpose", "axes": [1, 2, 0]}),
     "uint8", False),
])
def test_openvino_fuses_only_exact_preprocessing(steps, dtype, ok) -> None:
    from fleet.inference.backends.openvino_backend import fusable

    assert fusable(steps, dtype) is ok


def test_digits_preprocessing_stays_in_numpy() -> None:
    assert not Engine.open(EDGE_BUNDLE, "openvino").backend.takes_raw
