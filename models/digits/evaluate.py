"""Evaluation and threshold fitting on numpy arrays (no training stack needed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleet.inference.policy import CONFIDENCE_POLICIES, HardExamplePolicy

# Offload budget for the fitted threshold: below the 25% a deployment plans for, with room for
# the difference between validation and the field.
OFFLOAD_BUDGET = 0.22


@dataclass(frozen=True)
class Fitted:
    policy: str
    threshold: float
    val_offload_rate: float
    val_hybrid_accuracy: float
    auroc: float


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean `positives` (ties count half)."""
    pos = np.asarray(positives, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    s = np.asarray(scores)[order]
    # Average ranks over ties.
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def cascade_curve(scores: np.ndarray, edge_pred: np.ndarray, cloud_pred: np.ndarray,
                  y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every candidate threshold: (thresholds, offload rate, hybrid accuracy)."""
    cand = np.unique(np.concatenate([[-1.0], scores]))
    edge_ok = edge_pred == y
    cloud_ok = cloud_pred == y
    off = scores[None, :] > cand[:, None]
    rate = off.mean(axis=1)
    acc = np.where(off, cloud_ok[None, :], edge_ok[None, :]).mean(axis=1)
    return cand, rate, acc


def fit_threshold(policy: str, probs: np.ndarray, cloud_pred: np.ndarray, y: np.ndarray) -> Fitted:
    """The threshold that offloads the budgeted share of the validation inputs.

    The cloud model is the more accurate one, so offloading the next-hardest inputs does not
    lower the expected accuracy: under an offload budget the best operating point is the budget
    itself. (Picking the validation maximum instead stops early on plateaus made by a handful
    of validation samples.)
    """
    scores = HardExamplePolicy(policy, 0.0).scores(probs)
    edge_pred = probs.argmax(axis=1)
    thr, rate, acc = cascade_curve(scores, edge_pred, cloud_pred, y)
    ok = np.flatnonzero(rate <= OFFLOAD_BUDGET)
    i = int(ok[np.argmax(rate[ok])])
    return Fitted(policy, float(thr[i]), float(rate[i]), float(acc[i]),
                  auroc(scores, edge_pred != y))


def fit_all(probs: np.ndarray, cloud_pred: np.ndarray, y: np.ndarray) -> dict[str, Fitted]:
    return {p: fit_threshold(p, probs, cloud_pred, y) for p in CONFIDENCE_POLICIES}
