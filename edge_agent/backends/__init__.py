"""Inference backends behind one interface: onnxruntime and OpenVINO."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edge_agent.backends.base import FakeBackend, InferenceBackend
from edge_agent.errors import BackendError

BACKENDS = ("onnxruntime", "openvino")
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def available_backends() -> list[str]:
    """Backends whose runtime library is installed."""
    return [b for b in BACKENDS if importlib.util.find_spec(_MODULES[b]) is not None]


def resolve_backend(name: str, supported: tuple[str, ...] = BACKENDS) -> str:
    """Turn `auto` into a concrete backend: the first installed one the bundle supports.

    onnxruntime comes first: on the bundled tiny models its per-call overhead is several times
    lower than OpenVINO's (see docs/benchmarks.md).
    """
    have = available_backends()
    if name == "auto":
        for b in BACKENDS:
            if b in have and (not supported or b in supported):
                return b
        raise BackendError(f"no inference runtime installed for this bundle (supports "
                           f"{list(supported)}); install 'edge-hybrid-inference[agent]'")
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {[*BACKENDS, 'auto']}")
    if supported and name not in supported:
        raise BackendError(f"the bundle does not list {name!r} among its runtimes "
                           f"{list(supported)}")
    return name


def open_backend(name: str, model_path: Path, threads: int = 1) -> InferenceBackend:
    if name == "onnxruntime":
        from edge_agent.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_path, threads)
    if name == "openvino":
        from edge_agent.backends.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(model_path, threads)
    raise BackendError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")


__all__ = ["BACKENDS", "FakeBackend", "InferenceBackend", "available_backends", "open_backend",
           "resolve_backend"]
