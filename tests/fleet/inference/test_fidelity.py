"""The fidelity check: a backend whose answers drift from the bundle's reference does not serve.

Drift is CPU-dependent (onnxruntime's fused INT8 kernels without VNNI), so these tests make it
happen where they run: a backend wrapper that changes some answers (a deliberately perturbed
model), beside the real runtimes, which must pass on any CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fleet.inference.backends as backends
from fleet.contract.bundle import load_bundle
from fleet.inference.engine import Engine
from fleet.inference.errors import FidelityError
from fleet.inference.fidelity import FidelitySet, threshold_for_rate
from fleet.inference.fidelity import check as fidelity_check
from fleet.inference.policy import HardExamplePolicy
from fleet.lab.bundle_copy import break_fidelity, copy_bundle
from models import CLOUD_BUNDLE, EDGE_BUNDLE, STREAMS_FILE
from tests.fleet.inference.drift import swap_top2


@pytest.mark.parametrize("root", [EDGE_BUNDLE, CLOUD_BUNDLE], ids=["edge", "cloud"])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_shipped_bundles_are_faithful_on_both_runtimes(root: Path, backend: str) -> None:
    eng = Engine.open(root, backend)
    f = eng.fidelity
    assert f is not None and f.faithful, f
    assert f.agreement >= f.min_agreement == load_bundle(root).manifest.fidelity.min_agreement  # type: ignore[union-attr]
    assert f.samples == len(FidelitySet.load(eng.bundle).inputs) >= 700 and not eng.refused


def test_calibrated_threshold_offloads_the_budget_on_the_fidelity_set() -> None:
    eng = Engine.open(EDGE_BUNDLE, "onnxruntime")
    m = eng.manifest
    assert m.fidelity is not None and m.fidelity.offload_budget is not None
    assert eng.threshold_source == "calibrated"
    assert eng.calibration_scores is not None
    rate = float((eng.calibration_scores > eng.policy.threshold).mean())
    assert abs(rate - m.fidelity.offload_budget) <= 1 / len(eng.calibration_scores)
    # An explicit threshold wins; a policy without calibration takes the manifest's.
    assert Engine.open(EDGE_BUNDLE, "onnxruntime", threshold=0.5).policy.threshold == 0.5


def test_auto_skips_a_drifting_backend_and_serves_on_the_faithful_one(drifting) -> None:
    drifting("onnxruntime", swap_top2(every=20))  # 5% of answers change
    eng = Engine.open(EDGE_BUNDLE, "auto")
    assert eng.backend.name == "openvino"
    assert "onnxruntime" in eng.refused and "agreement" in eng.refused["onnxruntime"]
    summary = eng.fidelity_summary()
    assert summary is not None and summary["backend"] == "openvino" and summary["faithful"]
    assert "onnxruntime" in summary["refused"]


def test_a_named_drifting_backend_is_refused_with_the_reason(drifting) -> None:
    drifting("openvino", swap_top2(every=10))
    with pytest.raises(FidelityError, match="agreement") as err:
        Engine.open(EDGE_BUNDLE, "openvino")
    assert err.value.code == "fidelity" and "openvino" in err.value.reasons
    # "report" serves anyway and says so.
    eng = Engine.open(EDGE_BUNDLE, "openvino", fidelity="report")
    assert eng.fidelity is not None and not eng.fidelity.faithful
    assert abs(eng.fidelity.agreement - 0.9) < 0.02


def test_auto_fails_when_no_backend_is_faithful(drifting, tmp_path: Path) -> None:
    broken = copy_bundle(EDGE_BUNDLE, tmp_path / "b", version=1, key=None,
                         edit_files=break_fidelity)
    with pytest.raises(FidelityError) as err:
        Engine.open(broken, "auto")
    assert set(err.value.reasons) == {"onnxruntime", "openvino"}


def test_calibration_restores_the_budget_when_a_runtime_shifts_the_scores(drifting) -> None:
    """Top-1 unchanged, confidence lower (logits scaled): the manifest's threshold would offload
    far more than the budget; the threshold calibrated on the device keeps it."""
    drifting("onnxruntime", lambda out: out * 0.7)
    eng = Engine.open(EDGE_BUNDLE, "onnxruntime")
    f = eng.fidelity
    assert f is not None and f.faithful and f.agreement == 1.0
    assert f.offload_at_manifest is not None and f.budget is not None
    assert f.offload_at_manifest > f.budget + 0.1
    x = np.load(STREAMS_FILE)["mixed_x"]
    scores = eng.policy.scores(eng.predict_batch(x))
    manifest_rate = float((scores > f.manifest_threshold).mean())
    calibrated_rate = float((scores > eng.policy.threshold).mean())
    assert manifest_rate > f.budget + 0.1
    assert abs(calibrated_rate - f.budget) <= 0.04


def test_report_figures_match_a_direct_count() -> None:
    b = load_bundle(EDGE_BUNDLE)
    be = backends.open_backend("onnxruntime", b.model_path)
    he = b.manifest.hard_example
    assert he is not None
    report, scores = fidelity_check(b, be, HardExamplePolicy(he.policy, he.threshold))
    fs = FidelitySet.load(b)
    assert report.samples == len(fs.inputs) == len(scores)
    assert report.offload_at_manifest == pytest.approx(float((scores > he.threshold).mean()))
    assert report.accuracy is not None and report.reference_accuracy is not None
    assert abs(report.accuracy - report.reference_accuracy) <= 0.005


def test_threshold_for_rate() -> None:
    s = np.array([0.0, 1e-6, 1e-5, 1e-4, 1e-3])
    assert (s > threshold_for_rate(s, 0.4)).sum() == 2
    assert (s > threshold_for_rate(s, 0.0)).sum() == 0
    assert (s > threshold_for_rate(s, 1.0)).sum() == 5
