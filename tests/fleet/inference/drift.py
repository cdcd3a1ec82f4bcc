"""A backend that drifts on purpose: a real runtime whose outputs are changed (the way INT8
kernels of some CPUs change answers), for tests of the fidelity check wherever they run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import fleet.inference.backends as backends
from fleet.inference.backends.base import BackendOptions, InferenceBackend


class Perturbed:
    """A real backend whose outputs are changed by `edit` (the model "drifts")."""

    def __init__(self, inner: InferenceBackend, edit: Callable[[np.ndarray], np.ndarray]) -> None:
        self._inner, self._edit = inner, edit
        self.name, self.model_path, self.takes_raw = inner.name, inner.model_path, inner.takes_raw

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._edit(self._inner.run(batch))

    def bare_runner(self, batch: np.ndarray) -> Callable[[], object]:
        return self._inner.bare_runner(batch)

    def close(self) -> None:
        self._inner.close()


def swap_top2(every: int) -> Callable[[np.ndarray], np.ndarray]:
    """Swap the two largest logits of every `every`-th row of each batch: top-1 changes there."""
    def edit(out: np.ndarray) -> np.ndarray:
        out = out.copy()
        rows = np.arange(0, len(out), every)
        top2 = np.argsort(out[rows], axis=1)[:, -2:]
        a, b = top2[:, 0], top2[:, 1]
        out[rows, a], out[rows, b] = out[rows, b], out[rows, a].copy()
        return out
    return edit


Drift = Callable[[str, Callable[[np.ndarray], np.ndarray]], None]


@pytest.fixture
def drifting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Drift]:
    """Make the named runtime drift with `edit` wherever the agent opens it."""
    real = backends.open_backend

    def make(name: str, edit: Callable[[np.ndarray], np.ndarray]) -> None:
        def opener(n: str, model: Path, options: BackendOptions = backends.DEFAULT_OPTIONS
                   ) -> InferenceBackend:
            be = real(n, model, options)
            return Perturbed(be, edit) if n == name else be
        monkeypatch.setattr(backends, "open_backend", opener)
    yield make
