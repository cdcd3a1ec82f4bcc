"""The OpenVINO backend (CPU device)."""

from __future__ import annotations

import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fleet.inference.backends.base import DEFAULT_OPTIONS, BackendOptions
from fleet.inference.errors import BackendError


def fusable(preprocessing: tuple[dict[str, Any], ...], raw_dtype: str) -> bool:
    """Whether OpenVINO can run the bundle's preprocessing inside the model, exactly.

    uint8 images with `minmax` over at least 0..255 (so its clip never bites), optionally
    followed by an HWC -> CHW transpose: the camera case.
    """
    if raw_dtype != "uint8" or not preprocessing:
        return False
    first, rest = preprocessing[0], preprocessing[1:]
    if first.get("type") != "minmax" or float(first["min"]) > 0 or float(first["max"]) < 255:
        return False
    return rest == () or (len(rest) == 1 and rest[0].get("type") == "transpose"
                          and list(rest[0].get("axes", [])) == [2, 0, 1])


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, model_path: Path, options: BackendOptions = DEFAULT_OPTIONS) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendError("openvino is not installed: pip install "
                               "'edge-hybrid-inference[openvino]'") from None
        self.model_path = Path(model_path)
        config: dict[str, object] = {"PERFORMANCE_HINT": options.openvino_hint}
        # THROUGHPUT makes one stream per core group: capping its threads at the default 1
        # would leave it a single stream. LATENCY, or an explicit count, caps them.
        if options.openvino_hint == "LATENCY" or options.threads > 1:
            config["INFERENCE_NUM_THREADS"] = options.threads
        self.takes_raw = fusable(options.preprocessing, options.raw_dtype)
        try:
            core = ov.Core()
            if options.cache_dir is not None:
                options.cache_dir.mkdir(parents=True, exist_ok=True)
                # Compiled blobs keyed by model and device: later starts skip compilation.
                core.set_property({"CACHE_DIR": str(options.cache_dir / "openvino")})
            if self.takes_raw:
                self._compiled = core.compile_model(
                    self._with_preprocessing(ov, core.read_model(str(model_path)),
                                             options.preprocessing), "CPU", config)
            else:
                self._compiled = core.compile_model(str(model_path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with its own text
            raise BackendError(f"OpenVINO could not load {model_path}: {exc}") from None
        # An infer request is not thread-safe, and the agent serves requests from several
        # threads: a pool of as many requests as OpenVINO can run at once (1 with the LATENCY
        # hint, one per stream with THROUGHPUT).
        n = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.parallel_requests = max(1, n)
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.parallel_requests):
            self._pool.put(self._compiled.create_infer_request())

    @staticmethod
    def _with_preprocessing(ov: Any, model: Any, steps: tuple[dict[str, Any], ...]) -> Any:
        """The model taking raw uint8 images: convert, (x - min) / (max - min), re-layout."""
        from openvino.preprocess import PrePostProcessor

        mm = steps[0]
        lo, hi = float(mm["min"]), float(mm["max"])
        ppp = PrePostProcessor(model)
        tensor = ppp.input().tensor().set_element_type(ov.Type.u8)
        pre = ppp.input().preprocess().convert_element_type(ov.Type.f32)
        if lo:
            pre.mean(lo)
        pre.scale(hi - lo)
        if len(steps) > 1:  # HWC -> CHW
            tensor.set_layout(ov.Layout("NHWC"))
            ppp.input().model().set_layout(ov.Layout("NCHW"))
        return ppp.build()

    def run(self, batch: np.ndarray) -> np.ndarray:
        req = self._pool.get()
        try:
            # Zero-copy input: the call is synchronous, so the array outlives its use.
            req.infer({0: batch}, share_inputs=True)
            out: np.ndarray = req.get_output_tensor(0).data.copy()
        except Exception as exc:
            raise BackendError(f"OpenVINO failed on a {batch.dtype}{list(batch.shape)} "
                               f"batch: {exc}") from None
        finally:
            self._pool.put(req)
        return out

    def bare_runner(self, batch: np.ndarray) -> Callable[[], object]:
        req = self._compiled.create_infer_request()
        inputs = {0: batch}
        return lambda: req.infer(inputs, share_inputs=True)

    def close(self) -> None:
        del self._pool, self._compiled
