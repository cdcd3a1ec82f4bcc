"""The local inference path: a bundle's preprocessing, its model on a backend, and the policy."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fleet.contract.bundle import Bundle, load_bundle
from fleet.contract.errors import BundleError, ProtocolError
from fleet.inference.backends import BackendOptions, InferenceBackend, candidates, choose_fastest
from fleet.inference.errors import BackendError, FidelityError, InputError
from fleet.inference.fidelity import FidelityMode, FidelityReport
from fleet.inference.fidelity import check as fidelity_check
from fleet.inference.policy import CONFIDENCE_POLICIES, HardExamplePolicy, softmax
from fleet.inference.preprocess import Preprocessor

DEFAULT_POLICY = "max_prob"
DEFAULT_THRESHOLD = 0.2


@dataclass(frozen=True, slots=True)
class LocalResult:
    label: int
    confidence: float
    probs: np.ndarray
    score: float
    hard: bool
    edge_ms: float


class Engine:
    """Runs one bundle. Thread-safe: backends serialise or parallelise runs themselves."""

    def __init__(self, bundle: Bundle, backend: InferenceBackend,
                 policy: HardExamplePolicy) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.backend = backend
        self.policy = policy
        self.preprocess = Preprocessor.for_manifest(self.manifest)
        # The fidelity check of the serving backend (None: the bundle has no fidelity set, or
        # the check is off), the backends refused and why, and the calibration sample: the
        # fidelity set's hardness scores on this backend under this policy.
        self.fidelity: FidelityReport | None = None
        self.refused: dict[str, str] = {}
        self.calibration_scores: np.ndarray | None = None
        # Where the threshold came from: "settings", "calibrated" (fitted on this device for
        # the bundle's offload budget), "manifest" or "default".
        self.threshold_source = "default"
        # The threshold the engine opened with; an offload controller moves `policy.threshold`.
        self.base_threshold = policy.threshold

    @classmethod
    def open(cls, bundle_dir: Path, backend: str = "auto", threads: int = 1,
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
        try:
            bundle = load_bundle(bundle_dir)
        except BundleError as exc:
            raise BackendError(str(exc)) from None
        m = bundle.manifest
        opts = replace(options or BackendOptions(threads=threads),
                       preprocessing=m.preprocessing, raw_dtype=m.raw_input.dtype)
        he = m.hard_example
        pol = policy or (he.policy if he else DEFAULT_POLICY)
        scorer = HardExamplePolicy(pol, 0.0, seed=seed)
        reports: dict[str, tuple[FidelityReport, np.ndarray]] = {}

        def vet(be: InferenceBackend) -> str | None:
            report, scores = fidelity_check(bundle, be, scorer)
            reports[be.name] = (report, scores)
            return None if report.faithful or fidelity == "report" else report.reason()

        check = m.fidelity is not None and fidelity != "off"
        names = candidates(backend, m.runtimes)
        sample = np.zeros((1, *m.raw_input.shape), dtype=m.raw_input.dtype)
        try:
            be, _, refused = choose_fastest(names, bundle.model_path, m.model_file().sha256,
                                            sample, Preprocessor.for_manifest(m)(sample), opts,
                                            vet if check else None)
        except BackendError as exc:
            failed = {n: reports[n][0].reason() for n in reports}
            if failed:
                raise FidelityError(str(exc), failed) from None
            raise
        source = "settings"
        if threshold is None:
            report = reports.get(be.name, (None, None))[0]
            if (report is not None and report.calibrated_threshold is not None
                    and pol in CONFIDENCE_POLICIES):
                threshold, source = report.calibrated_threshold, "calibrated"
            elif he and pol == he.policy:
                threshold, source = he.threshold, "manifest"
            elif he and pol in he.thresholds:
                threshold, source = he.thresholds[pol], "manifest"
            else:
                threshold, source = DEFAULT_THRESHOLD, "default"
        eng = cls(bundle, be, HardExamplePolicy(pol, threshold, seed=seed))
        eng.refused, eng.threshold_source = refused, source
        if be.name in reports:
            eng.fidelity, eng.calibration_scores = reports[be.name]
        return eng

    def fidelity_summary(self) -> dict[str, Any] | None:
        """The fidelity figures of the serving backend, the backends refused and why, and where
        the threshold came from (for the reported state and telemetry)."""
        if self.fidelity is None and not self.refused:
            return None
        return {**(self.fidelity.to_dict() if self.fidelity else {}), "refused": self.refused,
                "threshold_source": self.threshold_source}

    def run(self, raw: np.ndarray) -> LocalResult:
        """Preprocess one raw sample, run the model, and ask the policy."""
        t0 = time.perf_counter()
        try:
            x = self._model_input(raw)
        except ProtocolError as exc:
            raise InputError(str(exc)) from None
        if x.shape[0] != 1:
            raise InputError(f"submit one sample at a time, got a batch of {x.shape[0]}")
        probs = softmax(self.backend.run(x))[0]
        label = int(probs.argmax())
        decision = self.policy.decide(probs)
        return LocalResult(label, float(probs[label]), probs, decision.score, decision.hard,
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
        return [LocalResult(int(lab), float(p[lab]), p, float(s), bool(s > self.policy.threshold),
                            per_input_ms)
                for lab, p, s in zip(labels, probs, scores, strict=True)]

    def _model_input(self, raw: np.ndarray) -> np.ndarray:
        """What the backend's `run` takes: the raw batch if it preprocesses, else ours."""
        if self.backend.takes_raw:
            batch = self.preprocess.check(raw)
            if batch.dtype != np.uint8:
                # The compiled model takes uint8 images: clip and round other numbers the way
                # our own preprocessing would treat them, instead of wrapping around.
                batch = np.rint(np.clip(batch, 0, 255))
            return np.ascontiguousarray(batch, dtype=np.uint8)
        return self.preprocess(raw, reuse=True)

    def predict_batch(self, raw: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of raw samples (evaluation and benchmarks)."""
        try:
            x = self._model_input(raw)
        except ProtocolError as exc:
            raise InputError(str(exc)) from None
        return softmax(self.backend.run(x))

    def close(self) -> None:
        """Release the model; a second call does nothing (agents may share an engine)."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self.backend.close()
