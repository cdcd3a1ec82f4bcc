"""A bundle's model on a backend: load and verify the bundle, pick a backend that passes the
bundle's fidelity check, preprocess as the manifest says, predict. What the hub runs; the
agent's `Engine` (engine.py) adds the hard-example policy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fleet.contract.bundle import Bundle, load_bundle
from fleet.contract.errors import BundleError, ProtocolError
from fleet.inference.backends import BackendOptions, InferenceBackend, candidates, choose_fastest
from fleet.inference.errors import BackendError, FidelityError, InputError
from fleet.inference.fidelity import FidelityMode, FidelityReport, FidelitySet
from fleet.inference.fidelity import check as fidelity_check
from fleet.inference.policy import HardExamplePolicy, softmax
from fleet.inference.preprocess import Preprocessor


class Model:
    """Runs one bundle's model. Thread-safe: backends serialise or parallelise runs."""

    def __init__(self, bundle: Bundle, backend: InferenceBackend) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.backend = backend
        self.preprocess = Preprocessor.for_manifest(self.manifest)
        # The fidelity check of the serving backend (None: the bundle has no fidelity set, or
        # the check is off), and the backends refused and why.
        self.fidelity: FidelityReport | None = None
        self.refused: dict[str, str] = {}

    @classmethod
    def open(cls, bundle_dir: Path, backend: str = "auto", threads: int = 1,
             options: BackendOptions | None = None,
             fidelity: FidelityMode = "enforce") -> Model:
        """Load and verify a bundle and open it on a backend that passes its fidelity check
        (`auto`: the fastest such; a named one that fails raises FidelityError)."""
        opened = select_backend(read_bundle(bundle_dir), backend, threads, options, fidelity,
                                None)
        m = cls(opened.bundle, opened.backend)
        m.refused = opened.refused
        m.fidelity = opened.report
        return m

    def fidelity_summary(self) -> dict[str, Any] | None:
        """The fidelity figures of the serving backend and the backends refused and why (for
        the reported state and telemetry)."""
        if self.fidelity is None and not self.refused:
            return None
        return {**(self.fidelity.to_dict() if self.fidelity else {}), "refused": self.refused}

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
        """Probabilities for a batch of raw samples."""
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


class Opened:
    """A bundle on the backend chosen for it, with the fidelity check's outcome."""

    def __init__(self, bundle: Bundle, backend: InferenceBackend, refused: dict[str, str],
                 report: FidelityReport | None, scores: np.ndarray | None) -> None:
        self.bundle, self.backend, self.refused = bundle, backend, refused
        self.report, self.scores = report, scores


def read_bundle(bundle_dir: Path) -> Bundle:
    """Load and verify a bundle (every file's length and sha256) for a backend to open."""
    try:
        return load_bundle(bundle_dir)
    except BundleError as exc:
        raise BackendError(str(exc)) from None


def select_backend(bundle: Bundle, backend: str, threads: int,
                   options: BackendOptions | None, fidelity: FidelityMode,
                   scorer: HardExamplePolicy | None) -> Opened:
    """Open a verified bundle on the fastest candidate backend that passes its fidelity
    check (with `scorer`, the fidelity set's hardness scores come back too: the calibration
    sample). Raises BackendError, or FidelityError when only the check stood in the way."""
    m = bundle.manifest
    opts = replace(options or BackendOptions(threads=threads),
                   preprocessing=m.preprocessing, raw_dtype=m.raw_input.dtype)
    reports: dict[str, tuple[FidelityReport, np.ndarray]] = {}
    fidelity_set: list[FidelitySet] = []  # read once, on the first backend checked

    def vet(be: InferenceBackend) -> str | None:
        if not fidelity_set:
            fidelity_set.append(FidelitySet.load(bundle))
        report, scores = fidelity_check(bundle, be, scorer, fidelity_set[0])
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
    report, scores = reports.get(be.name, (None, None))
    return Opened(bundle, be, refused, report, scores)
