"""The OpenVINO backend (CPU device, latency hint)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edge_agent.errors import BackendError


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, model_path: Path, threads: int = 1) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendError("openvino is not installed: pip install "
                               "'edge-hybrid-inference[openvino]'") from None
        self.model_path = Path(model_path)
        try:
            core = ov.Core()
            model = core.read_model(str(model_path))
            self._compiled = core.compile_model(model, "CPU", {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": threads,
            })
        except Exception as exc:  # OpenVINO raises RuntimeError with its own text
            raise BackendError(f"OpenVINO could not load {model_path}: {exc}") from None
        # An infer request is not thread-safe; the agent serves requests from several threads.
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        try:
            with self._lock:
                self._request.infer({0: batch})
                out: np.ndarray = self._request.get_output_tensor(0).data.copy()
        except Exception as exc:
            raise BackendError(f"OpenVINO failed on a {batch.dtype}{list(batch.shape)} "
                               f"batch: {exc}") from None
        return out

    def close(self) -> None:
        del self._request, self._compiled
