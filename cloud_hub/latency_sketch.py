"""Latency histograms that add up: what the hub keeps instead of scanning result rows.

A latency in milliseconds falls in one of `BINS` logarithmic bins, `BINS_PER_OCTAVE` per
doubling from `FLOOR_MS`: a bin's midpoint is within 2.2% of every latency in it, so a
percentile read off the histogram is within 2.2% of the exact one (nearest rank). Each input
counts in one of three kinds (answered at the edge, by the cloud, at the edge after an offload
went unanswered), so that the local, offloaded and overall percentiles come from one histogram.

Histograms of any number of devices, models and minutes merge by adding counts. On disk one is
sparse: (key, count) pairs, key = kind * BINS + bin, as little-endian uint16 and uint32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

FLOOR_MS = 1e-3
BINS_PER_OCTAVE = 16
BINS = 1024  # 64 octaves above FLOOR_MS: every finite latency a device can report
KINDS = ("edge", "cloud", "edge_fallback")  # the `source` of a result record
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
_PAIR = np.dtype([("key", "<u2"), ("n", "<u4")])
# Midpoint of each bin in ms (geometric).
MIDPOINTS = FLOOR_MS * np.exp2((np.arange(BINS) + 0.5) / BINS_PER_OCTAVE)


def bin_of(ms: float) -> int:
    if not ms > FLOOR_MS:  # also NaN
        return 0
    return min(BINS - 1, int(math.log2(ms / FLOOR_MS) * BINS_PER_OCTAVE))


def key_of(source: str, ms: float) -> int:
    return KIND_INDEX[source] * BINS + bin_of(ms)


def encode(counts: dict[int, int]) -> bytes:
    """A sparse histogram ({key: count}) as bytes."""
    arr = np.empty(len(counts), _PAIR)
    if counts:
        keys = sorted(counts)
        arr["key"] = keys
        arr["n"] = [counts[k] for k in keys]
    return arr.tobytes()


def decode(blob: bytes) -> dict[int, int]:
    arr = np.frombuffer(blob, _PAIR)
    return dict(zip(arr["key"].tolist(), arr["n"].tolist(), strict=True))


def merge_into(counts: dict[int, int], blob: bytes) -> None:
    for k, n in decode(blob).items():
        counts[k] = counts.get(k, 0) + n


def dense(blobs: Iterable[bytes], groups: Iterable[int], n_groups: int
          ) -> tuple[np.ndarray, int]:
    """Histograms of many rows added per group: (counts [group, kind, bin - lo], lo), over
    only the bins anything fell in (a fleet's full [group, kind, BINS] array is tens of MB)."""
    blobs = list(blobs)
    pairs = np.frombuffer(b"".join(blobs), _PAIR)
    if pairs.size == 0:
        return np.zeros((n_groups, len(KINDS), 0), np.int64), 0
    kind, b = np.divmod(pairs["key"].astype(np.int64), BINS)
    lo, hi = int(b.min()), int(b.max()) + 1
    width = hi - lo
    owner = np.repeat(np.fromiter(groups, np.int64, len(blobs)),
                      [len(x) // _PAIR.itemsize for x in blobs])
    # bincount adds in one pass (np.add.at is ten times slower); float64 counts are exact
    # below 2**53.
    flat = (owner * len(KINDS) + kind) * width + (b - lo)
    out = np.bincount(flat, weights=pairs["n"], minlength=n_groups * len(KINDS) * width)
    return out.astype(np.int64).reshape(n_groups, len(KINDS), width), lo


def percentiles(hists: np.ndarray, qs: Iterable[float], lo: int = 0) -> np.ndarray:
    """Percentiles (nearest rank, bin midpoints in ms) of many histograms at once: `hists` is
    [..., width] over bins lo .. lo + width - 1; the result is [..., len(qs)], NaN where a
    histogram is empty."""
    qs = list(qs)
    if hists.shape[-1] == 0:
        return np.full((*hists.shape[:-1], len(qs)), np.nan)
    cum = np.cumsum(hists, axis=-1)
    total = cum[..., -1:]
    out = []
    for q in qs:
        rank = np.maximum(1, np.ceil(q / 100.0 * total))
        idx = np.minimum(lo + (cum < rank).sum(axis=-1), BINS - 1)
        out.append(np.where(total[..., 0] > 0, MIDPOINTS[idx], np.nan))
    return np.stack(out, axis=-1)


def percentile(hist: np.ndarray, q: float, lo: int = 0) -> float | None:
    """The `q`th percentile (nearest rank) of one histogram over bins lo .., as the bin's
    midpoint rounded to 3 decimals; None if it is empty."""
    v = float(percentiles(hist, [q], lo)[0])
    return None if math.isnan(v) else round(v, 3)
