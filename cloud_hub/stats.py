"""Aggregates over result records: per device and model version."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub import latency_sketch as sketch
from cloud_hub import rollups
from cloud_hub.db import Device, HardExample, filter_results


def compute_stats(s: Session, device: str | None = None, since: float | None = None,
                  until: float | None = None) -> dict[str, Any]:
    """Count, offload rate, edge-cloud agreement on offloaded inputs, latency percentiles and
    bytes offloaded, per (device, model) and in total.

    Read from the running sums (cloud_hub/rollups.py), not from result rows: the cost grows
    with devices and minutes, not with inputs. `since`/`until` select whole minutes
    (`resolution_s`); percentiles are within 2.2% (cloud_hub/latency_sketch.py).
    """
    sums = rollups.read(s, device=device, since=since, until=until)
    counts = np.vstack([sums.counts, sums.counts.sum(axis=0, keepdims=True)])
    hists = np.concatenate([sums.hist, sums.hist.sum(axis=0, keepdims=True)])
    # Per group and in total: every source, the edge's, the cloud's; p50, p95, p99.
    every = sketch.percentiles(hists.sum(axis=1), (50, 95, 99), sums.lo)
    edge = sketch.percentiles(hists[:, sketch.KIND_INDEX["edge"]], (50, 99), sums.lo)
    cloud = sketch.percentiles(hists[:, sketch.KIND_INDEX["cloud"]], (50, 99), sums.lo)
    rows = [_summary(counts[i], every[i], edge[i], cloud[i]) for i in range(len(counts))]
    order = sorted(range(len(sums.groups)), key=lambda i: sums.groups[i])
    return {
        "groups": [{"device": sums.groups[i][0], "model": sums.groups[i][1], **rows[i]}
                   for i in order],
        "total": rows[-1],
        "resolution_s": rollups.BUCKET_S,
        "late_answers": _late(s, device, since, until),
        "offload": _offload(s, device),
    }


def _offload(s: Session, device: str | None) -> dict[str, Any]:
    """Each device's offloading as its latest telemetry says (mode, target, recent rate, drift),
    and the devices whose controller reports drift: the input of retraining."""
    q = select(Device.id, Device.offload).where(Device.offload.is_not(None)).order_by(Device.id)
    if device is not None:
        q = q.where(Device.id == device)
    rows = []
    for dev_id, off in s.execute(q):
        if not isinstance(off, dict):
            continue
        rows.append({"device": dev_id, **{k: off.get(k) for k in (
            "mode", "target", "recent_rate", "threshold", "drift", "drifting")}})
    return {"devices": rows, "drifting": [r["device"] for r in rows if r["drifting"] is True]}


def _late(s: Session, device: str | None, since: float | None,
          until: float | None) -> dict[str, Any]:
    """Hard examples answered late by the cloud: how many, why late, and how often the edge's
    final (degraded) answer agreed with the cloud's."""
    q = filter_results(select(HardExample.reason, HardExample.edge_label,
                              HardExample.cloud_label), device, since, until, HardExample)
    rows = list(s.execute(q))
    reasons: dict[str, int] = defaultdict(int)
    for r in rows:
        reasons[r.reason] += 1
    agree = sum(1 for r in rows if r.edge_label == r.cloud_label)
    return {"count": len(rows), "by_reason": dict(sorted(reasons.items())),
            "edge_agreement": round(agree / len(rows), 4) if rows else None}


def _ms(v: float) -> float | None:
    return None if math.isnan(v) else round(float(v), 3)


def _summary(counts: np.ndarray, every: np.ndarray, edge: np.ndarray,
             cloud: np.ndarray) -> dict[str, Any]:
    n, off, answered, agree, degraded, nbytes = (int(x) for x in counts)
    return {
        "count": n,
        "offloaded": off,
        "offload_rate": round(off / n, 4) if n else None,
        "cloud_answered": answered,
        "degraded": degraded,
        "agreement": round(agree / answered, 4) if answered else None,
        "latency_ms": {"p50": _ms(every[0]), "p95": _ms(every[1]), "p99": _ms(every[2])},
        "local_latency_ms": {"p50": _ms(edge[0]), "p99": _ms(edge[1])},
        "offload_latency_ms": {"p50": _ms(cloud[0]), "p99": _ms(cloud[1])},
        "bytes_offloaded": nbytes,
    }
