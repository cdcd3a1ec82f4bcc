"""The inference backend interface, and an in-memory fake for unit tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """How a backend runs a model; the same options serve the agent and its benchmark."""

    # Inference threads: 1 suits small models and devices shared with their application.
    threads: int = 1
    # OpenVINO's performance hint: "LATENCY" for one input at a time, "THROUGHPUT" for batches.
    openvino_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"
    # Where OpenVINO keeps compiled models between starts (a faster cold start); None: off.
    cache_dir: Path | None = None
    # The bundle's preprocessing, for a backend that can compile it into the model.
    preprocessing: tuple[dict[str, Any], ...] = ()
    raw_dtype: str = ""
    # onnxruntime's graph optimization level: "all" fuses INT8 (QDQ) nodes into integer kernels
    # (fast; their arithmetic depends on the CPU), "disabled" runs the graph as written
    # (quantize and dequantize emulated in float: the build's reference).
    ort_optimization: Literal["disabled", "basic", "extended", "all"] = "all"


DEFAULT_OPTIONS = BackendOptions()


def default_cache_dir() -> Path:
    """Where compiled models and the measured `auto` choice live: $XDG_CACHE_HOME/..."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-hybrid-inference"


class InferenceBackend(Protocol):
    """Runs one model on a preprocessed float32 batch and returns its first output."""

    name: str
    model_path: Path
    # True when the backend applies the bundle's preprocessing itself: `run` then takes raw
    # inputs (validated, batched) instead of preprocessed ones.
    takes_raw: bool

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def bare_runner(self, batch: np.ndarray) -> Callable[[], object]:
        """The runtime's own call on this model and `batch`, with nothing of ours around it."""
        ...

    def close(self) -> None: ...


class FakeBackend:
    """A backend computing `fn(batch)` in Python: for unit tests of the agent's logic."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], name: str = "fake") -> None:
        self.name = name
        self.model_path = Path("<memory>")
        self.takes_raw = False
        self._fn = fn
        self.calls = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self._fn(batch)

    def bare_runner(self, batch: np.ndarray) -> Callable[[], object]:
        return lambda: self._fn(batch)

    def close(self) -> None:
        pass
