"""The offload controller's arithmetic on synthetic score streams (no model, no network)."""

from __future__ import annotations

import math

import numpy as np

from edge_agent.offload_budget import BOUND_FACTOR, WINDOW, OffloadController

TARGET = 0.2


def _scores(rng: np.random.Generator, n: int, hardness: float) -> np.ndarray:
    """Scores of a confident model: log-normal, most tiny; `hardness` shifts them up (decades)."""
    return np.clip(np.exp(rng.normal(-10 + hardness * math.log(10), 3.0, n)), 0, 1)


def _run(ctl: OffloadController | None, threshold: float, scores: np.ndarray) -> np.ndarray:
    hard = np.empty(len(scores), bool)
    for i, s in enumerate(scores):
        t = ctl.threshold if ctl is not None else threshold
        hard[i] = s > t
        if ctl is not None:
            ctl.observe(float(s), bool(hard[i]))
    return hard


def _windows(hard: np.ndarray, size: int = 100) -> list[float]:
    return [float(hard[i:i + size].mean()) for i in range(0, len(hard), size)]


def test_controller_holds_the_target_through_a_drift_where_a_fixed_threshold_does_not() -> None:
    rng = np.random.default_rng(1)
    calibration = _scores(rng, 720, 0.0)
    threshold = float(np.quantile(calibration, 1 - TARGET))
    # Easy -> much harder (two decades) -> easy again, 600 inputs each.
    stream = np.concatenate([_scores(rng, 600, 0.0), _scores(rng, 600, 1.0),
                             _scores(rng, 600, 0.0)])
    static = _windows(_run(None, threshold, stream))
    ctl = OffloadController(TARGET, threshold, calibration)
    budget = _windows(_run(ctl, threshold, stream))
    assert max(static[6:12]) > TARGET + 0.15  # the fixed threshold follows the inputs
    # The controller: every window 300 inputs after a switch is within 4 points of the target.
    settled = budget[0:6] + budget[9:12] + budget[15:18]
    assert max(abs(w - TARGET) for w in settled) <= 0.04, budget


def test_no_oscillation_on_a_stationary_stream() -> None:
    rng = np.random.default_rng(2)
    calibration = _scores(rng, 720, 0.0)
    threshold = float(np.quantile(calibration, 1 - TARGET))
    ctl = OffloadController(TARGET, threshold, calibration)
    stream = _scores(rng, 3000, 0.0)
    thresholds = []
    for s in stream:
        hard = s > ctl.threshold
        thresholds.append(ctl.observe(float(s), bool(hard)))
    # Input to input the threshold moves (the feedback paces offloads), but over any 100 inputs
    # its median stays within what a quantile of WINDOW scores can miss by (3 standard errors
    # of the share), and what it offloads per 100 inputs stays within 4 points: no swing from
    # bound to bound.
    se = 3 * math.sqrt(TARGET * (1 - TARGET) / WINDOW)
    lo, hi = np.quantile(stream, 1 - TARGET - se), np.quantile(stream, 1 - TARGET + se)
    t = np.array(thresholds)
    medians = [float(np.median(t[i:i + 100])) for i in range(100, len(t) - 100, 25)]
    assert lo <= min(medians) and max(medians) <= hi, (min(medians), max(medians), lo, hi)
    assert ctl.bounds[0] <= t.min() and t.max() <= ctl.bounds[1]
    hard = stream[1:] > t[:-1]
    assert max(abs(w - TARGET) for w in _windows(hard[100:])) <= 0.04


def test_bounds_hold_and_drift_is_raised_when_the_inputs_leave_the_calibration() -> None:
    rng = np.random.default_rng(3)
    calibration = _scores(rng, 720, 0.0)
    threshold = float(np.quantile(calibration, 1 - TARGET))
    ctl = OffloadController(TARGET, threshold, calibration)
    lo, hi = ctl.bounds
    assert lo < threshold < hi
    # Every input maximally uncertain: the controller cannot get back to 20% within bounds.
    for _ in range(500):
        ctl.observe(1.0, ctl.threshold < 1.0)
        assert lo <= ctl.threshold <= hi
    st = ctl.state()
    assert st.threshold == hi
    assert st.drifting and st.drift is not None and st.drift >= 1.0
    # Calibration share at the upper bound: target / BOUND_FACTOR, so drift = log2(factor).
    assert abs(st.drift - math.log2(BOUND_FACTOR)) < 0.3
    # Every input certain (score 0): the threshold goes no lower than its lower bound.
    for _ in range(500):
        ctl.observe(0.0, ctl.threshold < 0.0)
        assert lo <= ctl.threshold <= hi
    assert ctl.state().drift is not None and ctl.state().drift <= -1.0  # type: ignore[operator]


def test_inputs_like_the_calibration_raise_no_drift() -> None:
    rng = np.random.default_rng(4)
    calibration = _scores(rng, 720, 0.0)
    threshold = float(np.quantile(calibration, 1 - TARGET))
    ctl = OffloadController(TARGET, threshold, calibration)
    _run(ctl, threshold, _scores(rng, 1000, 0.0))
    st = ctl.state()
    assert st.drift is not None and abs(st.drift) < 0.5 and not st.drifting
    assert st.recent_rate is not None and abs(st.recent_rate - TARGET) <= 0.05


def test_byte_budget_lowers_the_share_to_fit_the_link() -> None:
    rng = np.random.default_rng(5)
    calibration = _scores(rng, 720, 0.0)
    threshold = float(np.quantile(calibration, 1 - TARGET))
    now = [0.0]
    # 100 inputs/s, 1,000 bytes per offload, at most 5,000 bytes/s: 5% of the inputs.
    ctl = OffloadController(TARGET, threshold, calibration, max_bytes_per_s=5000.0,
                            clock=lambda: now[0])
    hard_all = []
    for s in _scores(rng, 3000, 0.0):
        now[0] += 0.01
        hard = bool(s > ctl.threshold)
        hard_all.append(hard)
        ctl.observe(float(s), hard, 1000 if hard else 0)
    assert abs(ctl.effective_target() - 0.05) < 0.005
    assert abs(np.mean(hard_all[1000:]) - 0.05) < 0.02


def test_without_calibration_the_threshold_stays_within_the_policy_range() -> None:
    ctl = OffloadController(TARGET, 0.5, None)
    assert ctl.bounds == (0.0, 1.0) and ctl.state().drift is None
    rng = np.random.default_rng(6)
    hard = _run(ctl, 0.5, rng.random(1000))
    assert abs(hard[300:].mean() - TARGET) < 0.03
