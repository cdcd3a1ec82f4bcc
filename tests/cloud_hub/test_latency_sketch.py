"""Latency histograms: percentiles within their stated error, and sums that add up."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_hub import latency_sketch as sketch


def _hist(values: np.ndarray, kind: str = "edge") -> dict[int, int]:
    counts: dict[int, int] = {}
    for v in values.tolist():
        k = sketch.key_of(kind, v)
        counts[k] = counts.get(k, 0) + 1
    return counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_are_within_the_bins_error_of_the_exact_ones(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.lognormal(np.log(2.0), 1.0, 5000)  # 0.1 ms .. 100 ms
    hists, lo = sketch.dense([sketch.encode(_hist(values))], [0], 1)
    dense = hists[0, 0]
    for q in (1, 50, 95, 99, 99.9):
        exact = float(np.percentile(values, q, method="inverted_cdf"))
        got = sketch.percentile(dense, q, lo)
        assert got == pytest.approx(exact, rel=0.022), q
        assert sketch.percentiles(dense, [q], lo)[0] == pytest.approx(got, abs=1e-3)


def test_histograms_add_up_in_any_grouping() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.lognormal(0, 1, n) for n in (10, 200, 3000)]
    whole = sketch.dense([sketch.encode(_hist(np.concatenate(parts)))], [0], 1)
    split = sketch.dense([sketch.encode(_hist(v)) for v in parts], [0, 0, 0], 1)
    assert whole[1] == split[1] and (whole[0] == split[0]).all()
    merged: dict[int, int] = {}
    for v in parts:
        sketch.merge_into(merged, sketch.encode(_hist(v)))
    assert merged == _hist(np.concatenate(parts))
    two, _ = sketch.dense([sketch.encode(_hist(parts[0])),
                           sketch.encode(_hist(parts[1], "cloud"))], [0, 1], 2)
    assert two[0, 0].sum() == 10 and two[1, sketch.KIND_INDEX["cloud"]].sum() == 200


def test_extremes_and_empties() -> None:
    assert sketch.bin_of(0.0) == 0 and sketch.bin_of(float("nan")) == 0
    assert sketch.bin_of(1e300) == sketch.BINS - 1
    assert sketch.percentile(np.zeros(sketch.BINS, np.int64), 50) is None
    assert np.isnan(sketch.percentiles(np.zeros((2, sketch.BINS), np.int64), [50])).all()
