"""The local inference path: a bundle's preprocessing, its model on a backend, and the policy."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_agent.backends import BackendOptions, InferenceBackend, candidates, choose_fastest
from edge_agent.errors import BackendError, InputError
from edge_agent.policy import HardExamplePolicy, softmax
from fleet.bundle import Bundle, load_bundle
from fleet.errors import BundleError, ProtocolError
from fleet.preprocess import Preprocessor

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

    @classmethod
    def open(cls, bundle_dir: Path, backend: str = "auto", threads: int = 1,
             policy: str | None = None, threshold: float | None = None,
             seed: int | None = None, options: BackendOptions | None = None) -> Engine:
        """Load and verify a bundle, open it on a backend, and set up the hard-example policy.

        `auto` opens the fastest installed backend for this model (measured once, cached in
        `options.cache_dir`). Without `policy`/`threshold` the manifest's recommendation is
        used; a policy without a threshold takes the one the manifest fitted for it.
        """
        try:
            bundle = load_bundle(bundle_dir)
        except BundleError as exc:
            raise BackendError(str(exc)) from None
        m = bundle.manifest
        opts = replace(options or BackendOptions(threads=threads),
                       preprocessing=m.preprocessing, raw_dtype=m.raw_input.dtype)
        names = candidates(backend, m.runtimes)
        sample = np.zeros((1, *m.raw_input.shape), dtype=m.raw_input.dtype)
        be, _ = choose_fastest(names, bundle.model_path, m.model_file().sha256,
                               sample, Preprocessor.for_manifest(m)(sample), opts)
        he = m.hard_example
        pol = policy or (he.policy if he else DEFAULT_POLICY)
        if threshold is None:
            if he and pol == he.policy:
                threshold = he.threshold
            elif he and pol in he.thresholds:
                threshold = he.thresholds[pol]
            else:
                threshold = DEFAULT_THRESHOLD
        return cls(bundle, be, HardExamplePolicy(pol, threshold, seed=seed))

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
