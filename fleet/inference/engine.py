"""The agent's inference path: a bundle's model (model.py) and the hard-example policy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fleet.contract.bundle import Bundle
from fleet.contract.errors import ProtocolError
from fleet.inference.backends import BackendOptions, InferenceBackend
from fleet.inference.errors import InputError
from fleet.inference.fidelity import FidelityMode
from fleet.inference.model import Model, read_bundle, select_backend
from fleet.inference.policy import (
    CONFIDENCE_POLICIES,
    SCALAR_MAX_CLASSES,
    HardExamplePolicy,
    softmax,
    softmax_one,
)

DEFAULT_POLICY = "max_prob"
DEFAULT_THRESHOLD = 0.2


class LocalResult(NamedTuple):
    """What the edge model made of one input (a tuple: the hot path builds one per input)."""

    label: int
    confidence: float
    score: float
    hard: bool
    edge_ms: float


class Engine(Model):
    """A model and its hard-example policy. Thread-safe like the model."""

    def __init__(self, bundle: Bundle, backend: InferenceBackend,
                 policy: HardExamplePolicy) -> None:
        super().__init__(bundle, backend)
        self.policy = policy
        # The fidelity set's hardness scores on this backend under this policy: the offload
        # controller's calibration sample.
        self.calibration_scores: np.ndarray | None = None
        # Where the threshold came from: "settings", "calibrated" (fitted on this device for
        # the bundle's offload budget), "manifest" or "default".
        self.threshold_source = "default"
        # The threshold the engine opened with; an offload controller moves `policy.threshold`.
        self.base_threshold = policy.threshold

    @classmethod
    def open(cls, bundle_dir: Path, backend: str = "auto", threads: int = 1,  # type: ignore[override]
             policy: str | None = None, threshold: float | None = None,
             seed: int | None = None, options: BackendOptions | None = None,
             fidelity: FidelityMode = "enforce") -> Engine:
        """Load and verify a bundle, open it on a backend, and set up the hard-example policy.

        `auto` opens the fastest installed backend for this model (measured once, cached in
        `options.cache_dir`) among those that pass the bundle's fidelity check; a named backend
        that fails it raises FidelityError (with `fidelity="enforce"`). Without `threshold`
        the threshold is the one calibrated on this device for the bundle's offload budget,
        else the manifest's for the policy (the manifest's recommended policy by default).
        """
        bundle = read_bundle(bundle_dir)
        he = bundle.manifest.hard_example
        pol = policy or (he.policy if he else DEFAULT_POLICY)
        opened = select_backend(bundle, backend, threads, options, fidelity,
                                HardExamplePolicy(pol, 0.0, seed=seed))
        source = "settings"
        if threshold is None:
            report = opened.report
            if (report is not None and report.calibrated_threshold is not None
                    and pol in CONFIDENCE_POLICIES):
                threshold, source = report.calibrated_threshold, "calibrated"
            elif he and pol == he.policy:
                threshold, source = he.threshold, "manifest"
            elif he and pol in he.thresholds:
                threshold, source = he.thresholds[pol], "manifest"
            else:
                threshold, source = DEFAULT_THRESHOLD, "default"
        eng = cls(opened.bundle, opened.backend, HardExamplePolicy(pol, threshold, seed=seed))
        eng.refused, eng.threshold_source = opened.refused, source
        eng.fidelity, eng.calibration_scores = opened.report, opened.scores
        return eng

    def fidelity_summary(self) -> dict[str, Any] | None:
        """The model's fidelity figures and where the threshold came from."""
        summary = super().fidelity_summary()
        return None if summary is None else {**summary, "threshold_source": self.threshold_source}

    def run(self, raw: np.ndarray) -> LocalResult:
        """Preprocess one raw sample, run the model, and ask the policy."""
        t0 = time.perf_counter()
        try:
            x = self._model_input(raw)
        except ProtocolError as exc:
            raise InputError(str(exc)) from None
        if x.shape[0] != 1:
            raise InputError(f"submit one sample at a time, got a batch of {x.shape[0]}")
        logits = self.backend.run(x)[0]
        policy = self.policy
        if logits.size <= SCALAR_MAX_CLASSES:
            probs, label = softmax_one(logits)
            score = policy.score_one(probs, label)
            confidence = probs[label]
        else:
            p = softmax(logits)
            label = int(p.argmax())
            score, confidence = float(policy.scores(p)[0]), float(p[label])
        return LocalResult(label, confidence, score, score > policy.threshold,
                           (time.perf_counter() - t0) * 1000.0)

    def run_batch(self, raw: np.ndarray) -> list[LocalResult]:
        """Like `run` for a batch [N, *raw_input]: one preprocessing and one model call."""
        t0 = time.perf_counter()
        try:
            x = self._model_input(raw)
        except ProtocolError as exc:
            raise InputError(str(exc)) from None
        probs = softmax(self.backend.run(x))
        labels = probs.argmax(axis=1)
        scores = self.policy.scores(probs)
        per_input_ms = (time.perf_counter() - t0) * 1000.0 / len(probs)
        return [LocalResult(int(lab), float(p[lab]), float(s), bool(s > self.policy.threshold),
                            per_input_ms)
                for lab, p, s in zip(labels, probs, scores, strict=True)]
