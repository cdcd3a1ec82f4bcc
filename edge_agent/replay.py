"""A built-in source: replays a stream file (`{stream}_x` arrays in an .npz) into the agent.

The agent never reads labels: each input carries an `input_ref` ("mixed:17") by which the
evaluation joins the hub's records to the ground truth.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_agent.errors import ConfigError
from fleet.inference.errors import InputError

log = logging.getLogger(__name__)


def load_stream(path: Path, stream: str) -> np.ndarray:
    try:
        with np.load(path) as data:
            key = f"{stream}_x"
            if key not in data:
                have = sorted(k[:-2] for k in data.files if k.endswith("_x"))
                raise ConfigError(f"stream {stream!r} is not in {path}; it holds {have}")
            return np.asarray(data[key])
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read stream file {path}: {exc}") from None


def shard_indices(n: int, index: int, count: int, limit: int | None = None) -> np.ndarray:
    """The inputs one of `count` agents replays: every count-th, starting at `index`."""
    if index >= count:
        raise ConfigError(f"shard index {index} must be below the shard count {count}")
    idx = np.arange(index, n, count)
    return idx[:limit] if limit else idx


def replay(infer: Callable[[np.ndarray, str], object], x: np.ndarray, indices: np.ndarray,
           stream: str, rate_hz: float, stop: threading.Event) -> int:
    """Feed the inputs at a fixed rate; returns how many were answered."""
    period = 1.0 / rate_hz if rate_hz > 0 else 0.0
    t_next = time.perf_counter()
    done = 0
    for i in indices:
        if stop.is_set():
            break
        if period:
            delay = t_next - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t_next += period
        try:
            infer(x[i], f"{stream}:{int(i)}")
            done += 1
        except InputError as exc:
            log.error("replay input %s:%d refused: %s", stream, i, exc)
    return done
