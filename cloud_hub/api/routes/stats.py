from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from cloud_hub.api.bounds import DeviceFilter, Epoch
from cloud_hub.api.deps import SessionDep
from cloud_hub.stats import compute_stats

router = APIRouter(prefix="/v1/stats", tags=["stats"])


@router.get("", response_model=dict[str, Any])
def stats(session: SessionDep, device: DeviceFilter = None, since: Epoch = None,
          until: Epoch = None) -> JSONResponse:
    """Per device and model version: count, offload rate, edge-cloud agreement on offloaded
    inputs, latency p50/p95/p99, bytes offloaded; and the same in total. From the running sums
    (to the minute: `resolution_s`); percentiles within 2.2%."""
    # Plain JSON types already: serialized as they are (a fleet's groups are large, and
    # FastAPI's generic encoder took longer than computing them).
    return JSONResponse(compute_stats(session, device, since, until))
