"""Inference backends behind one interface: onnxruntime and OpenVINO.

`auto` measures every installed backend the bundle supports on the bundle's own model, picks
the fastest, and caches the choice (keyed by the model's hash, the runtime versions and the
CPU), so that only the first start on a device pays for the measurement. Before that first
measurement each candidate is probed in a child process (backends/probe.py): one that crashes
natively there is refused as `crashed`, and the agent goes on with the others.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fleet.inference.backends.base import (
    DEFAULT_OPTIONS,
    BackendOptions,
    FakeBackend,
    InferenceBackend,
)
from fleet.inference.backends.probe import DEFAULT_OPENER, probe_backend
from fleet.inference.errors import BackendError

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "openvino")
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
_DISTRIBUTIONS = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
# Measuring a backend for `auto`: warm-up calls, then timed calls; the median decides.
AUTO_WARMUP_CALLS = 20
AUTO_TIMED_CALLS = 200
AUTO_CACHE_FILE = "backend-choice.json"


def available_backends() -> list[str]:
    """Backends whose runtime library is installed."""
    return [b for b in BACKENDS if importlib.util.find_spec(_MODULES[b]) is not None]


def candidates(name: str, supported: tuple[str, ...] = BACKENDS) -> list[str]:
    """The backends `name` may mean: itself, or for `auto` every installed one the bundle lists."""
    have = available_backends()
    if name == "auto":
        found = [b for b in BACKENDS if b in have and (not supported or b in supported)]
        if not found:
            raise BackendError(f"no inference runtime installed for this bundle (supports "
                               f"{list(supported)}); install 'edge-hybrid-inference[agent]'")
        return found
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {[*BACKENDS, 'auto']}")
    if supported and name not in supported:
        raise BackendError(f"the bundle does not list {name!r} among its runtimes "
                           f"{list(supported)}")
    return [name]


def open_backend(name: str, model_path: Path,
                 options: BackendOptions = DEFAULT_OPTIONS) -> InferenceBackend:
    if name == "onnxruntime":
        from fleet.inference.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_path, options)
    if name == "openvino":
        from fleet.inference.backends.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(model_path, options)
    raise BackendError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")


def median_call_us(backend: InferenceBackend, batch: np.ndarray,
                   warmup: int = AUTO_WARMUP_CALLS, timed: int = AUTO_TIMED_CALLS) -> float:
    run = backend.bare_runner(batch)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(timed):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def _versions(names: list[str]) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(_DISTRIBUTIONS[n])
        except importlib.metadata.PackageNotFoundError:
            out[n] = "?"
    return out


# A backend's fitness for the bundle, checked once it is open: None if it may serve, else the
# reason it may not (the fidelity check).
Vet = Callable[[InferenceBackend], str | None]


def _vetted(name: str, model_path: Path, options: BackendOptions, vet: Vet | None,
            refused: dict[str, str], probe_with: tuple[np.ndarray, np.ndarray] | None = None,
            opener: str = DEFAULT_OPENER) -> InferenceBackend | None:
    """`name` opened on the model and vetted; None (the reason in `refused`) if it may not serve.
    With `probe_with` (raw, preprocessed), it is first loaded and run in a child process."""
    if probe_with is not None:
        why = probe_backend(name, model_path, options, *probe_with, opener=opener)
        if why is not None:
            log.error("backend %s refused: %s", name, why)
            refused[name] = why
            return None
    try:
        be = open_backend(name, model_path, options)
    except BackendError as exc:
        log.warning("backend %s unusable: %s", name, exc)
        refused[name] = str(exc)
        return None
    reason = vet(be) if vet is not None else None
    if reason is not None:
        log.warning("backend %s refused: %s", name, reason)
        refused[name] = reason
        be.close()
        return None
    return be


def choose_fastest(names: list[str], model_path: Path, model_sha256: str, raw: np.ndarray,
                   preprocessed: np.ndarray, options: BackendOptions, vet: Vet | None = None,
                   opener: str = DEFAULT_OPENER
                   ) -> tuple[InferenceBackend, dict[str, float], dict[str, str]]:
    """Open the fastest of `names` that `vet` accepts, measuring once per model, runtime and CPU.

    Returns the backend, the measured timings (median µs per call) and the refused backends
    with their reasons. Raises BackendError when none can serve; its message names every
    backend's reason. Each backend is timed on what its `run` takes: `raw` if it preprocesses
    itself, else `preprocessed` (our preprocessing, a few µs to 0.1 ms, is left out).
    """
    refused: dict[str, str] = {}

    def none_left() -> BackendError:
        why = "; ".join(f"{n}: {r}" for n, r in refused.items())
        return BackendError(f"no backend can serve {model_path}: {why}")

    if len(names) == 1:
        be = _vetted(names[0], model_path, options, vet, refused)
        if be is None:
            raise none_left()
        return be, {}, refused
    key = json.dumps({"model": model_sha256, "versions": _versions(names),
                      "cpu": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "threads": options.threads,
                      "hint": options.openvino_hint, "ort": options.ort_optimization,
                      "preprocessing": list(options.preprocessing)}, sort_keys=True)
    cache = options.cache_dir / AUTO_CACHE_FILE if options.cache_dir else None
    known: dict[str, dict[str, float]] = {}
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
    if key in known:
        timings = known[key]
        # The fastest measured first; one the measurement left out (refused then) last.
        for n in sorted(names, key=lambda b: timings.get(b, float("inf"))):
            be = _vetted(n, model_path, options, vet, refused)
            if be is not None:
                log.info("auto backend: %s (cached measurement, median us per call %s)", n,
                         timings)
                return be, timings, refused
        raise none_left()
    timings, opened = {}, {}
    for n in names:
        # Not measured here before: load it in a child process first, so that a runtime that
        # crashes natively on this model or CPU costs a probe, not the agent.
        be = _vetted(n, model_path, options, vet, refused, (raw, preprocessed), opener)
        if be is None:
            continue
        timings[n] = round(median_call_us(be, raw if be.takes_raw else preprocessed), 2)
        opened[n] = be
    if not opened:
        raise none_left()
    best = min(timings, key=lambda b: timings[b])
    for n, be in opened.items():
        if n != best:
            be.close()
    log.info("auto backend: %s (measured median us per call %s)", best, timings)
    if cache is not None:
        known[key] = timings
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(cache)
        except OSError as exc:
            log.warning("could not cache the backend choice in %s: %s", cache, exc)
    return opened[best], timings, refused


__all__ = ["BACKENDS", "BackendOptions", "FakeBackend", "InferenceBackend", "available_backends",
           "candidates", "choose_fastest", "open_backend"]
