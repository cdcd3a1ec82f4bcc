"""The onnxruntime backend (CPU execution provider)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fleet.inference.backends.base import DEFAULT_OPTIONS, BackendOptions
from fleet.inference.errors import BackendError

_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
           "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class OnnxRuntimeBackend:
    name = "onnxruntime"
    takes_raw = False

    def __init__(self, model_path: Path, options: BackendOptions = DEFAULT_OPTIONS) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install "
                               "'edge-hybrid-inference[agent]'") from None
        opts = ort.SessionOptions()
        # Threads: 1 by default, since small models gain nothing from more and several agents
        # or the application share the device's cores.
        opts.intra_op_num_threads = options.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                _LEVELS[options.ort_optimization])
        opts.log_severity_level = 3
        self.model_path = Path(model_path)
        try:
            self._sess = ort.InferenceSession(str(model_path), sess_options=opts,
                                              providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"onnxruntime could not load {model_path}: {exc}") from None
        self._input = self._sess.get_inputs()[0].name
        self._output = self._sess.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        try:
            out: np.ndarray = self._sess.run([self._output], {self._input: batch})[0]
        except Exception as exc:
            raise BackendError(f"onnxruntime failed on a {batch.dtype}{list(batch.shape)} "
                               f"batch: {exc}") from None
        return out

    def bare_runner(self, batch: np.ndarray) -> Callable[[], object]:
        sess, feed, outs = self._sess, {self._input: batch}, [self._output]
        return lambda: sess.run(outs, feed)

    def close(self) -> None:
        del self._sess
