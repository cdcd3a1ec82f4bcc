"""The offload budget: a controller that keeps a device's offload rate at its target.

The bundle states the share of inputs it was fitted to offload (its budget); at install the
device fits its own threshold for that share on the fidelity set (fleet/inference/fidelity.py).
As the inputs drift (a dirtier lens, a new site), the same threshold offloads more or less: 19.7% of
the mixed stream, 30.3% of shifted inputs alone. In `budget` mode this controller moves the
threshold so that the device keeps offloading its target share:

- feed-forward: the threshold is the score that `r` of the last `window` inputs exceeded, so
  the hardest inputs go first whatever the score distribution is now;
- feedback: `r` is the target plus the offloads the device owes (or minus those it took in
  advance) repaid over `horizon` inputs. The debt leaks away over `memory` inputs, and is
  capped, so a long stretch at a bound does not wind up a burst afterwards.

The rate never leaves [target / BOUND_FACTOR, target * BOUND_FACTOR], and the threshold never
leaves the thresholds that give those rates on the calibration sample: an input stream that
needs more than that is drift, not something to chase. The controller also reports drift: how
far its threshold sits from the calibrated one, as the log2 ratio of the target to the share of
the calibration sample the current threshold would offload (0: none; +1: the threshold now
offloads half the calibration share, the inputs look harder than the bundle's; -1: easier).

A byte budget for metered links caps the target at `max_bytes_per_s` divided by the input rate
and the mean offload size, both measured.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fleet.inference.fidelity import threshold_in_sorted

OffloadMode = Literal["threshold", "budget"]

# Scores the feed-forward quantile is taken over: enough that one input moves the threshold
# little (no oscillation), few enough to follow a switch of input distribution within a window.
# Tuned on the digits clean -> shifted -> clean stream (docs/offload-budget.md): 100 and 200
# both hold every window of 100 inputs within 3 points; 100 follows a switch sooner.
WINDOW = 100
# Debt repaid over this many inputs: the feedback's strength. Smaller keeps every window of
# 100 inputs closer to the target but lets pacing, not the scores, choose what goes (3 cost
# 0.7 points of hybrid accuracy there); 25 let single windows stray 5 points.
HORIZON = 8
# The debt is capped at this many horizons' worth of target offloads (anti-windup); the
# share asked for bends within [target / BOUND_FACTOR, target * BOUND_FACTOR] anyway. With 1
# single windows strayed 3 points after a switch, with 3 at most 2.
CAP_FACTOR = 3.0
# The debt forgets with this time constant (inputs), so old history does not steer forever.
MEMORY = 200
# The target may be bent by the debt to within this factor either way, and so may the
# threshold's offload share on the calibration sample.
BOUND_FACTOR = 4.0
# Drift is raised when the threshold offloads less than half or more than twice the target
# share of the calibration sample (|drift| >= 1).
DRIFT_LIMIT = 1.0
# Input rate for the byte budget: an exponential average over about this many seconds.
RATE_TAU_S = 10.0


@dataclass(frozen=True, slots=True)
class BudgetState:
    """What the controller reports (telemetry, the hub's device view)."""

    mode: str
    target: float
    effective_target: float
    threshold: float
    calibrated_threshold: float | None
    bounds: tuple[float, float]
    recent_rate: float | None
    inputs: int
    drift: float | None
    drifting: bool
    max_bytes_per_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "target": self.target,
                "effective_target": round(self.effective_target, 5),
                "threshold": self.threshold, "calibrated_threshold": self.calibrated_threshold,
                "bounds": list(self.bounds),
                "recent_rate": None if self.recent_rate is None else round(self.recent_rate, 4),
                "inputs": self.inputs,
                "drift": None if self.drift is None else round(self.drift, 3),
                "drifting": self.drifting, "max_bytes_per_s": self.max_bytes_per_s}


class OffloadController:
    """Moves a threshold so that the share of scores above it stays at `target`.

    Thread-safe: `observe` is called by every request thread after its decision.
    """

    def __init__(self, target: float, threshold: float, calibration: np.ndarray | None = None,
                 *, max_bytes_per_s: float | None = None, window: int = WINDOW,
                 horizon: float = HORIZON, memory: float = MEMORY,
                 bound_factor: float = BOUND_FACTOR, clock: Any = time.monotonic) -> None:
        if not 0.0 < target < 1.0:
            raise ValueError(f"offload target {target} is not in (0, 1)")
        self.target = target
        self.max_bytes_per_s = max_bytes_per_s
        self.calibrated = threshold
        self._horizon, self._leak = horizon, 1.0 - 1.0 / memory
        self._rate_lo = target / bound_factor
        self._rate_hi = min(1.0, target * bound_factor)
        self._clock = clock
        self._lock = threading.Lock()
        cal = (np.sort(np.asarray(calibration, dtype=np.float64))
               if calibration is not None and len(calibration) else None)
        self._cal = cal
        if cal is not None:
            self.bounds = (threshold_in_sorted(cal, self._rate_hi),
                           threshold_in_sorted(cal, self._rate_lo))
            # Start from the calibration sample: the first inputs see the calibrated threshold.
            pick = np.linspace(0, len(cal) - 1, min(window, len(cal))).round().astype(int)
            start = cal[pick].tolist()
        else:
            self.bounds = (0.0, 1.0)
            start = []
        self._recent: deque[float] = deque(start, maxlen=window)
        self._sorted: list[float] = sorted(start)
        self._hard: deque[bool] = deque(maxlen=100)
        self._debt = 0.0
        self._inputs = 0
        self._bytes_avg: float | None = None
        self._rate_avg: float | None = None
        self._last_t: float | None = None
        self.threshold = min(max(threshold, self.bounds[0]), self.bounds[1])

    # ------------------------------------------------------------------ the loop

    def effective_target(self) -> float:
        """The target share, capped by the byte budget when one is set."""
        t = self.target
        if (self.max_bytes_per_s is not None and self._rate_avg and self._bytes_avg):
            t = min(t, self.max_bytes_per_s / (self._rate_avg * self._bytes_avg))
        return max(t, 1e-6)

    def observe(self, score: float, hard: bool, offload_bytes: int = 0) -> float:
        """Record one decision (its score, whether it was offloaded, and the offload's size)
        and return the threshold for the next input."""
        with self._lock:
            self._inputs += 1
            self._measure_rate(offload_bytes if hard else 0)
            if math.isfinite(score):
                if len(self._recent) == self._recent.maxlen:
                    old = self._recent[0]
                    del self._sorted[bisect.bisect_left(self._sorted, old)]
                self._recent.append(score)
                bisect.insort(self._sorted, score)
            self._hard.append(hard)
            target = self.effective_target()
            cap = self._horizon * CAP_FACTOR * target
            self._debt = max(-cap, min(cap, self._debt * self._leak + target - float(hard)))
            if not self._sorted:
                return self.threshold
            lo_rate, hi_rate = target / BOUND_FACTOR, min(1.0, target * BOUND_FACTOR)
            rate = min(hi_rate, max(lo_rate, target + self._debt / self._horizon))
            lo, hi = self.bounds
            self.threshold = min(hi, max(lo, threshold_in_sorted(self._sorted, rate)))
            return self.threshold

    def _measure_rate(self, nbytes: int) -> None:
        if self.max_bytes_per_s is None:
            return
        now = self._clock()
        if self._last_t is not None:
            dt = max(now - self._last_t, 1e-6)
            a = 1.0 - math.exp(-dt / RATE_TAU_S)
            inst = 1.0 / dt
            self._rate_avg = inst if self._rate_avg is None else (
                self._rate_avg + a * (inst - self._rate_avg))
        self._last_t = now
        if nbytes > 0:
            self._bytes_avg = float(nbytes) if self._bytes_avg is None else (
                0.95 * self._bytes_avg + 0.05 * nbytes)

    # ------------------------------------------------------------------ reports

    def drift(self) -> float | None:
        """log2(target / the calibration share the feed-forward threshold offloads): the
        threshold at the target share of the recent scores, without the feedback's pacing."""
        if self._cal is None:
            return None
        plain = self.threshold
        if self._sorted:
            lo, hi = self.bounds
            plain = min(hi, max(lo, threshold_in_sorted(self._sorted, self.effective_target())))
        n = len(self._cal)
        above = n - int(np.searchsorted(self._cal, plain, side="right"))
        share = max(above, 0.5) / n  # half an input: a finite figure when none is above
        return math.log2(self.target / share)

    def state(self, mode: str = "budget") -> BudgetState:
        with self._lock:
            d = self.drift()
            recent = (sum(self._hard) / len(self._hard)) if self._hard else None
            return BudgetState(mode, self.target, self.effective_target(), self.threshold,
                               self.calibrated, self.bounds, recent, self._inputs, d,
                               d is not None and abs(d) >= DRIFT_LIMIT, self.max_bytes_per_s)
