"""Hard-example policies: decide from the edge model's probabilities whether to offload.

Every policy maps an input's class probabilities to a hardness score in [0, 1]; an input is hard
(offloaded) when its score is above the policy's threshold. One convention for all makes the
threshold sweep, the fitting and the AUROC of "score predicts an edge error" uniform.

- `max_prob`: 1 - max probability.
- `margin`:   1 - (top-1 minus top-2 probability).
- `entropy`:  normalised entropy, H(p) / log(K).
- `random`:   a uniform random score; threshold t offloads a share of about 1 - t (baseline).
- `edge_only`: never offloads (baseline).
- `cloud_only`: always offloads (baseline).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ScoreFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]
# The same score for one input's probabilities as plain floats, with its top class.
OneScoreFn = Callable[[Sequence[float], int, np.random.Generator], float]

# Up to this many classes, one input's softmax and score run on Python floats: numpy's fixed
# cost per call (about 0.4 us, 0.8 for a reduction) is most of the work on ten classes.
SCALAR_MAX_CLASSES = 64


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64: confident models put 1 - p below float32's resolution (6e-8),
    and the scores of most inputs would tie at exactly 0."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def softmax_one(logits: np.ndarray) -> tuple[list[float], int]:
    """One input's probabilities as floats (float64, as `softmax`) and its top class.

    Computed on Python floats: for a small model's handful of classes four times cheaper than
    numpy's calls, and equal to `softmax` up to the summation's rounding (1e-16)."""
    v = logits.tolist()
    top = max(v)
    label = v.index(top)
    e = [math.exp(a - top) for a in v]
    total = math.fsum(e)
    return [a / total for a in e], label


def _max_prob(p: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
    out: np.ndarray = 1.0 - p.max(axis=-1)
    return out


def _margin(p: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
    top2 = np.partition(p, -2, axis=-1)[..., -2:]
    out: np.ndarray = 1.0 - (top2[..., 1] - top2[..., 0])
    return out


def _entropy(p: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
    k = p.shape[-1]
    q = np.clip(p, 1e-12, 1.0)
    out: np.ndarray = np.clip(-(q * np.log(q)).sum(axis=-1) / np.log(k), 0.0, 1.0)
    return out


def _random(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out: np.ndarray = rng.random((p.shape[0],))
    return out


def _zeros(p: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
    return np.zeros(p.shape[0])


def _ones(p: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
    return np.ones(p.shape[0])


def _max_prob_one(p: Sequence[float], label: int, _rng: np.random.Generator) -> float:
    return 1.0 - p[label]


def _margin_one(p: Sequence[float], label: int, _rng: np.random.Generator) -> float:
    second = max((q for i, q in enumerate(p) if i != label), default=0.0)
    return 1.0 - (p[label] - second)


def _entropy_one(p: Sequence[float], _label: int, _rng: np.random.Generator) -> float:
    h = -math.fsum(q * math.log(q) for q in (min(max(q, 1e-12), 1.0) for q in p))
    return min(max(h / math.log(len(p)), 0.0), 1.0)


def _random_one(_p: Sequence[float], _label: int, rng: np.random.Generator) -> float:
    return float(rng.random())


SCORES: dict[str, ScoreFn] = {
    "max_prob": _max_prob,
    "margin": _margin,
    "entropy": _entropy,
    "random": _random,
    "edge_only": _zeros,
    "cloud_only": _ones,
}
SCORES_ONE: dict[str, OneScoreFn] = {
    "max_prob": _max_prob_one,
    "margin": _margin_one,
    "entropy": _entropy_one,
    "random": _random_one,
    "edge_only": lambda _p, _label, _rng: 0.0,
    "cloud_only": lambda _p, _label, _rng: 1.0,
}
# Policies whose threshold is fitted on validation data; the others are baselines.
CONFIDENCE_POLICIES = ("max_prob", "margin", "entropy")
# Fixed thresholds of the baselines: edge_only never exceeds 1, cloud_only always exceeds -1.
BASELINE_THRESHOLDS = {"edge_only": 1.0, "cloud_only": -1.0}


@dataclass(frozen=True, slots=True)
class Decision:
    score: float
    hard: bool


class HardExamplePolicy:
    """A named score function and a threshold."""

    def __init__(self, name: str, threshold: float, seed: int | None = None) -> None:
        if name not in SCORES:
            raise ValueError(f"unknown policy {name!r}; choose one of {sorted(SCORES)}")
        self.name = name
        self.threshold = BASELINE_THRESHOLDS.get(name, threshold)
        self._score = SCORES[name]
        self._score_one = SCORES_ONE[name]
        self._rng = np.random.default_rng(seed)

    def scores(self, probs: np.ndarray) -> np.ndarray:
        return self._score(np.atleast_2d(probs), self._rng)

    def decide(self, probs: np.ndarray) -> Decision:
        s = float(self.scores(probs)[0])
        return Decision(score=s, hard=s > self.threshold)

    def score_one(self, probs: Sequence[float], label: int) -> float:
        """`scores` of one input's probabilities given as floats, with their top class."""
        return self._score_one(probs, label, self._rng)

    def __repr__(self) -> str:
        return f"HardExamplePolicy({self.name!r}, threshold={self.threshold:.4g})"
