"""A bundle's preprocessing, applied alike on the device, in the hub and in the pipeline.

A manifest's `preprocessing` is a list of steps:
- `{"type": "minmax", "min": a, "max": b}`: (x - a) / (b - a), clipped to [0, 1];
- `{"type": "standardize", "mean": m, "std": s}`: (x - m) / s;
- `{"type": "reshape", "shape": [...]}`: the per-sample shape the model wants;
- `{"type": "transpose", "axes": [2, 0, 1]}`: reorder a sample's axes (HWC -> CHW).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fleet.contract.bundle import Manifest, TensorSpec
from fleet.contract.errors import BundleError, ProtocolError

# Reused buffers per thread: a few batch shapes at a time.
_MAX_BUFFERS = 8

# A step works in place on a float32 working array and returns it (or a view of it).
Step = Callable[[np.ndarray], np.ndarray]


def _minmax(spec: dict[str, Any]) -> Step:
    lo, hi = float(spec["min"]), float(spec["max"])
    if hi <= lo:
        raise BundleError(f"minmax step needs max > min, got {lo}..{hi}")
    scale = np.float32(1.0 / (hi - lo))
    lo32 = np.float32(lo)

    def step(x: np.ndarray) -> np.ndarray:
        if lo32:
            np.subtract(x, lo32, out=x)
        np.multiply(x, scale, out=x)
        return np.clip(x, 0.0, 1.0, out=x)

    return step


def _standardize(spec: dict[str, Any]) -> Step:
    mean, std = np.float32(spec["mean"]), np.float32(spec["std"])
    if std <= 0:
        raise BundleError("standardize step needs std > 0")

    def step(x: np.ndarray) -> np.ndarray:
        np.subtract(x, mean, out=x)
        return np.divide(x, std, out=x)

    return step


def _reshape(spec: dict[str, Any]) -> Step:
    shape = tuple(int(s) for s in spec["shape"])
    return lambda x: x.reshape((x.shape[0], *shape))


def _transpose(spec: dict[str, Any]) -> Step:
    axes = (0, *(int(a) + 1 for a in spec["axes"]))
    return lambda x: x.transpose(axes)


_STEPS: dict[str, Callable[[dict[str, Any]], Step]] = {
    "minmax": _minmax,
    "standardize": _standardize,
    "reshape": _reshape,
    "transpose": _transpose,
}


class Preprocessor:
    """Validates raw inputs against the manifest's `raw_input` and turns them into model inputs."""

    def __init__(self, raw_input: TensorSpec, steps: Sequence[dict[str, Any]]) -> None:
        self.raw_input = raw_input
        self._sample_shape = tuple(s for s in raw_input.shape)
        self._local = threading.local()
        self._steps: list[Step] = []
        for spec in steps:
            kind = spec.get("type")
            if kind not in _STEPS:
                raise BundleError(f"unknown preprocessing step {kind!r}; known: {sorted(_STEPS)}")
            try:
                self._steps.append(_STEPS[kind](spec))
            except KeyError as exc:
                raise BundleError(f"preprocessing step {kind!r} is missing {exc}") from None

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> Preprocessor:
        return cls(manifest.raw_input, manifest.preprocessing)

    def check(self, x: np.ndarray) -> np.ndarray:
        """Return `x` as a batch of raw samples, or raise ProtocolError saying what is wrong."""
        if not isinstance(x, np.ndarray):
            raise ProtocolError(f"input must be an array, got {type(x).__name__}")
        if x.dtype.kind not in "fiu":
            raise ProtocolError(f"input dtype {x.dtype} is not numeric")
        if x.shape == self._sample_shape:
            x = x[np.newaxis]
        elif x.shape[1:] != self._sample_shape or x.shape[0] < 1:
            raise ProtocolError(
                f"input shape {list(x.shape)} does not match {list(self._sample_shape)} "
                f"(one sample) or [N, {', '.join(map(str, self._sample_shape))}] (a batch)")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ProtocolError("input contains NaN or infinity")
        return x

    def check_sample(self, x: np.ndarray) -> np.ndarray:
        """One raw sample, validated (for callers that batch samples themselves)."""
        batch = self.check(x)
        if batch.shape[0] != 1:
            raise ProtocolError(f"submit one sample at a time, got a batch of {batch.shape[0]}")
        return batch[0]

    def __call__(self, x: np.ndarray, reuse: bool = False) -> np.ndarray:
        """The model input for `x` (one sample or a batch), C-contiguous float32.

        With `reuse`, the result lives in a buffer of the calling thread that the thread's next
        call overwrites: for a hot path that hands it to the model at once. Fresh arrays cost a
        large input its page faults and cache misses (docs/benchmarks.md).
        """
        batch = self.check(x)
        if not reuse:
            work = batch.astype(np.float32)  # a copy: the steps work in place
            for step in self._steps:
                work = step(work)
            return np.ascontiguousarray(work)
        work = self._buffer("work", batch.shape)
        np.copyto(work, batch, casting="unsafe")
        for step in self._steps:
            work = step(work)
        if work.flags.c_contiguous:
            return work
        out = self._buffer("out", work.shape)
        np.copyto(out, work)
        return out

    def _buffer(self, role: str, shape: tuple[int, ...]) -> np.ndarray:
        bufs: dict[tuple[str, tuple[int, ...]], np.ndarray] = self._local.__dict__.setdefault(
            "bufs", {})
        key = (role, shape)
        buf = bufs.get(key)
        if buf is None:
            if len(bufs) >= _MAX_BUFFERS:
                bufs.clear()  # batch sizes come and go; keep the cache bounded
            buf = bufs[key] = np.empty(shape, dtype=np.float32)
        return buf
