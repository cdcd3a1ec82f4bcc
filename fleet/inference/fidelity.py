"""Does this backend, on this CPU, give the answers the bundle promises? The fidelity check.

A bundle may carry a fidelity set (`FidelitySpec`): a few hundred inputs drawn like the stream
from the validation split, with the outputs the build computed for them. Before a backend serves
the bundle (at every start and before an update switches), the agent runs the set on it and
compares: the top-1 agreement with the reference must reach the manifest's floor, or the bundle
is refused on that backend (code `fidelity`) and the next backend is tried. The same run gives
the offload rate at the manifest's threshold and the threshold that offloads the bundle's budget
on this device (the calibrated threshold), so a device whose runtime shifts the scores still
offloads what the bundle promised.

Why it is needed: INT8 kernels differ between CPUs (onnxruntime's fused u8s8 kernels saturate
without VNNI; docs/benchmarks.md), and one golden input does not show it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fleet.contract.bundle import Bundle, FidelitySpec, Manifest, file_entry, write_manifest
from fleet.contract.errors import ProtocolError
from fleet.inference.backends.base import InferenceBackend
from fleet.inference.cpu import cpu_flags, cpu_name
from fleet.inference.errors import BackendError
from fleet.inference.policy import HardExamplePolicy, softmax
from fleet.inference.preprocess import Preprocessor

log = logging.getLogger(__name__)

FIDELITY_FILE = "fidelity.npz"
# Samples run per model call: bounds the memory of big inputs (224x224x3 images).
CHUNK = 64
# "enforce": an unfaithful backend is not used; "report": it is used, and the figures say so
# (for a device whose only runtime drifts and whose owner accepts it); "off": not checked.
FidelityMode = Literal["enforce", "report", "off"]


@dataclass(frozen=True, slots=True)
class FidelityReport:
    """The fidelity set on one backend: how it agrees with the reference, and what it offloads."""

    bundle: str
    backend: str
    samples: int
    agreement: float
    min_agreement: float
    accuracy: float | None             # on the set's labels, this backend
    reference_accuracy: float | None   # the same for the build's reference outputs
    policy: str | None
    manifest_threshold: float | None
    offload_at_manifest: float | None  # this backend, at the manifest's threshold
    reference_offload: float | None    # the reference outputs, at the same threshold
    budget: float | None
    calibrated_threshold: float | None  # offloads `budget` of the set on this backend
    cpu: str = ""
    cpu_flags: tuple[str, ...] = ()

    @property
    def faithful(self) -> bool:
        return self.agreement >= self.min_agreement

    def reason(self) -> str:
        return (f"{self.bundle} on {self.backend}: top-1 agreement with the reference "
                f"{self.agreement:.2%} on {self.samples} fidelity samples is below the "
                f"bundle's floor of {self.min_agreement:.2%} (CPU {self.cpu}, "
                f"{' '.join(self.cpu_flags) or 'no SIMD flags'})")

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "backend": self.backend, "samples": self.samples,
                "agreement": round(self.agreement, 5), "min_agreement": self.min_agreement,
                "faithful": self.faithful, "accuracy": _r(self.accuracy),
                "reference_accuracy": _r(self.reference_accuracy), "policy": self.policy,
                "manifest_threshold": self.manifest_threshold,
                "offload_at_manifest": _r(self.offload_at_manifest),
                "reference_offload": _r(self.reference_offload), "budget": self.budget,
                "calibrated_threshold": self.calibrated_threshold, "cpu": self.cpu,
                "cpu_flags": list(self.cpu_flags)}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 5)


@dataclass(frozen=True, slots=True)
class FidelitySet:
    inputs: np.ndarray       # raw samples, as applications submit them
    reference: np.ndarray    # the model's outputs the build computed (logits)
    labels: np.ndarray | None

    @classmethod
    def load(cls, bundle: Bundle) -> FidelitySet:
        spec = bundle.manifest.fidelity
        assert spec is not None
        try:
            with np.load(bundle.root / spec.file, allow_pickle=False) as z:
                x, ref = z["input"], z["reference"]
                labels = z["labels"] if "labels" in z.files else None
        except (OSError, KeyError, ValueError) as exc:
            raise BackendError(f"bundle {bundle.manifest.ref}: cannot read its fidelity set "
                               f"{spec.file}: {exc}") from None
        if len(x) == 0 or len(ref) != len(x) or (labels is not None and len(labels) != len(x)):
            raise BackendError(f"bundle {bundle.manifest.ref}: fidelity set {spec.file} has "
                               f"{len(x)} inputs, {len(ref)} reference outputs")
        # Inputs may be stored narrower than the raw input (float16 for float32: half the
        # bytes); the reference was computed on exactly these values.
        return cls(x.astype(bundle.manifest.raw_input.dtype, copy=False), ref, labels)


def threshold_for_rate(scores: np.ndarray, rate: float) -> float:
    """The threshold above which `rate` of `scores` lie (hard means score > threshold)."""
    return threshold_in_sorted(np.sort(np.asarray(scores, dtype=np.float64)), rate)


def threshold_in_sorted(sorted_scores: Sequence[float] | np.ndarray, rate: float) -> float:
    """`threshold_for_rate` on scores already sorted (the offload controller keeps its window
    sorted, and calls this on every input)."""
    n = len(sorted_scores)
    k = min(n, max(0, round(rate * n)))  # inputs to offload
    if k == 0:
        return float(sorted_scores[-1])
    if k == n:
        return float(np.nextafter(sorted_scores[0], -np.inf))
    # Halfway between the last kept and the first offloaded score (on a log scale when both
    # are positive: confident models' scores span many decades).
    lo, hi = float(sorted_scores[n - k - 1]), float(sorted_scores[n - k])
    return math.sqrt(lo * hi) if lo > 0 else lo


def run_set(backend: InferenceBackend, manifest: Manifest, inputs: np.ndarray) -> np.ndarray:
    """The backend's probabilities on raw `inputs`, preprocessed as the engine would."""
    pre = Preprocessor.for_manifest(manifest)
    out = []
    for i in range(0, len(inputs), CHUNK):
        raw = inputs[i:i + CHUNK]
        try:
            if backend.takes_raw:
                x = np.ascontiguousarray(pre.check(raw), dtype=np.uint8)
            else:
                x = pre(raw)
        except ProtocolError as exc:
            raise BackendError(f"fidelity inputs do not fit the bundle: {exc}") from None
        out.append(softmax(backend.run(x)))
    return np.concatenate(out)


def check(bundle: Bundle, backend: InferenceBackend, policy: HardExamplePolicy | None = None,
          fidelity_set: FidelitySet | None = None) -> tuple[FidelityReport, np.ndarray]:
    """Run the bundle's fidelity set on `backend` (`fidelity_set`: the set already read, when
    several backends are checked). Returns the report and the hardness scores of the set under
    `policy` (the manifest's recommended one by default): the calibration sample of the
    offload controller."""
    m = bundle.manifest
    spec = m.fidelity
    assert spec is not None
    fs = fidelity_set or FidelitySet.load(bundle)
    probs = run_set(backend, m, fs.inputs)
    ref = softmax(fs.reference)
    agreement = float((probs.argmax(1) == ref.argmax(1)).mean())
    he = m.hard_example
    pol_m = HardExamplePolicy(he.policy, he.threshold) if he else None
    pol = policy or pol_m
    scores = pol.scores(probs) if pol is not None else np.zeros(len(probs))
    calibrated = (threshold_for_rate(scores, spec.offload_budget)
                  if pol is not None and spec.offload_budget is not None else None)

    def acc(p: np.ndarray) -> float | None:
        return None if fs.labels is None else float((p.argmax(1) == fs.labels).mean())

    report = FidelityReport(
        bundle=m.ref, backend=backend.name, samples=len(probs), agreement=agreement,
        min_agreement=spec.min_agreement, accuracy=acc(probs), reference_accuracy=acc(ref),
        policy=pol.name if pol is not None else None,
        manifest_threshold=he.threshold if he else None,
        offload_at_manifest=(float((pol_m.scores(probs) > pol_m.threshold).mean())
                             if pol_m else None),
        reference_offload=(float((pol_m.scores(ref) > pol_m.threshold).mean())
                           if pol_m else None),
        budget=spec.offload_budget, calibrated_threshold=calibrated, cpu=cpu_name(),
        cpu_flags=tuple(cpu_flags()))
    log.info("fidelity of %s on %s: agreement %.2f%% (floor %.2f%%), offload at the manifest "
             "threshold %s, calibrated threshold %s", m.ref, backend.name, 100 * agreement,
             100 * spec.min_agreement, report.offload_at_manifest, calibrated)
    return report, scores


def record_fidelity(bundle_dir: Path, inputs: np.ndarray, labels: np.ndarray | None,
                    min_agreement: float, offload_budget: float | None,
                    reference: InferenceBackend, reference_text: str) -> Manifest:
    """Add a fidelity set to a bundle (which then needs signing again): `inputs`, the outputs
    of `reference` on them, the floor and the offload budget. Returns the new manifest.

    float32 inputs are stored as float16 (half the bytes of the bundle's largest file for
    small models); the reference is computed on the float16 values, so nothing is lost."""
    from fleet.contract.bundle import load_bundle

    b = load_bundle(bundle_dir)
    stored = inputs.astype(np.float16) if inputs.dtype == np.float32 else inputs
    inputs = stored.astype(inputs.dtype)
    pre = Preprocessor.for_manifest(b.manifest)
    outs = [reference.run(pre(inputs[i:i + CHUNK])) for i in range(0, len(inputs), CHUNK)]
    arrays: dict[str, np.ndarray] = {"input": stored, "reference": np.concatenate(outs)}
    if labels is not None:
        arrays["labels"] = labels.astype(np.int16)
    np.savez_compressed(bundle_dir / FIDELITY_FILE, allow_pickle=False, **arrays)
    m = b.manifest
    files = tuple(f for f in m.files if f.path != FIDELITY_FILE)
    m = replace(m, extra={k: v for k, v in m.extra.items() if k != "signatures"},
                files=(*files, file_entry(bundle_dir, FIDELITY_FILE, "fidelity")),
                fidelity=FidelitySpec(FIDELITY_FILE, min_agreement, offload_budget,
                                      reference_text))
    write_manifest(bundle_dir, m)
    return m
