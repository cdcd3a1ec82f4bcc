"""The inference backend interface, and an in-memory fake for unit tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np


class InferenceBackend(Protocol):
    """Runs one model on a preprocessed float32 batch and returns its first output."""

    name: str
    model_path: Path

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class FakeBackend:
    """A backend computing `fn(batch)` in Python: for unit tests of the agent's logic."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], name: str = "fake") -> None:
        self.name = name
        self.model_path = Path("<memory>")
        self._fn = fn
        self.calls = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self._fn(batch)

    def close(self) -> None:
        pass
