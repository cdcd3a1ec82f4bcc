"""Percentiles of measured values, as the demo and the benches report them."""

from __future__ import annotations

import numpy as np


def percentile(values: list[float], q: float) -> float | None:
    """The `q`th percentile of `values` to 3 decimals (None for none)."""
    return round(float(np.percentile(values, q)), 3) if values else None
