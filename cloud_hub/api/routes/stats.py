from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from cloud_hub.api.bounds import DeviceFilter, Epoch
from cloud_hub.api.deps import SessionDep
from cloud_hub.stats import compute_stats

router = APIRouter(prefix="/v1/stats", tags=["stats"])


@router.get("")
def stats(session: SessionDep, device: DeviceFilter = None, since: Epoch = None,
          until: Epoch = None) -> dict[str, Any]:
    """Per device and model version: count, offload rate, edge-cloud agreement on offloaded
    inputs, latency p50/p95/p99, bytes offloaded; and the same in total."""
    return compute_stats(session, device, since, until)
