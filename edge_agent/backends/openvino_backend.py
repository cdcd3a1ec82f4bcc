"""The OpenVINO backend (CPU device)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_agent.backends.base import DEFAULT_OPTIONS, BackendOptions
from edge_agent.errors import BackendError


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, model_path: Path, options: BackendOptions = DEFAULT_OPTIONS) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendError("openvino is not installed: pip install "
                               "'edge-hybrid-inference[openvino]'") from None
        self.model_path = Path(model_path)
        config: dict[str, object] = {
            "PERFORMANCE_HINT": options.openvino_hint,
            "INFERENCE_NUM_THREADS": options.threads,
        }
        try:
            core = ov.Core()
            if options.cache_dir is not None:
                options.cache_dir.mkdir(parents=True, exist_ok=True)
                # Compiled blobs keyed by model and device: later starts skip compilation.
                core.set_property({"CACHE_DIR": str(options.cache_dir / "openvino")})
            self._compiled = core.compile_model(str(model_path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with its own text
            raise BackendError(f"OpenVINO could not load {model_path}: {exc}") from None
        # An infer request is not thread-safe; the agent serves requests from several threads.
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        try:
            with self._lock:
                # Zero-copy input: the call is synchronous, so the array outlives its use.
                self._request.infer({0: batch}, share_inputs=True)
                out: np.ndarray = self._request.get_output_tensor(0).data.copy()
        except Exception as exc:
            raise BackendError(f"OpenVINO failed on a {batch.dtype}{list(batch.shape)} "
                               f"batch: {exc}") from None
        return out

    def bare_runner(self, batch: np.ndarray) -> Callable[[], object]:
        req = self._compiled.create_infer_request()
        inputs = {0: batch}
        return lambda: req.infer(inputs, share_inputs=True)

    def close(self) -> None:
        del self._request, self._compiled
