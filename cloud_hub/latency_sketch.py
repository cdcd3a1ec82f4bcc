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


def dense(blobs: Iterable[bytes], groups: Iterable[int], n_groups: int) -> np.ndarray:
    """Histograms of many rows added per group: an array [group, kind, bin] of counts."""
    out = np.zeros((n_groups, len(KINDS) * BINS), np.int64)
    parts = []
    gidx = []
    for g, b in zip(groups, blobs, strict=True):
        arr = np.frombuffer(b, _PAIR)
        parts.append(arr)
        gidx.append(np.full(len(arr), g, np.int64))
    if parts:
        allp = np.concatenate(parts)
        np.add.at(out, (np.concatenate(gidx), allp["key"].astype(np.int64)),
                  allp["n"].astype(np.int64))
    return out.reshape(n_groups, len(KINDS), BINS)


def percentile(hist: np.ndarray, q: float) -> float | None:
    """The `q`th percentile (nearest rank) of a histogram of BINS counts, as the bin's midpoint
    rounded to 3 decimals; None if it is empty."""
    total = int(hist.sum())
    if total == 0:
        return None
    rank = max(1, math.ceil(q / 100.0 * total))
    idx = int(np.searchsorted(np.cumsum(hist), rank))
    return round(float(MIDPOINTS[min(idx, BINS - 1)]), 3)
