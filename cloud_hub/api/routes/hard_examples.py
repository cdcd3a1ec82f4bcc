"""Hard examples the devices answered without the cloud, with their late cloud answers: the
material for statistics and for retraining the edge model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel
from sqlalchemy import func, select

from cloud_hub.api.bounds import Cursor, DeviceFilter, ItemId, Limit
from cloud_hub.api.deps import SessionDep, SettingsDep
from cloud_hub.db import HardExample

router = APIRouter(prefix="/v1/hard-examples", tags=["hard examples"])

_FIELDS = ("id", "device", "ts", "received_at", "model", "reason", "edge_label", "edge_score",
           "cloud_label", "cloud_confidence", "cloud_model", "dtype", "shape")


class HardExamplesPage(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: int | None


@router.get("/count")
def count_hard_examples(session: SessionDep, device: DeviceFilter = None) -> dict[str, int]:
    q = select(func.count()).select_from(HardExample)
    if device:
        q = q.where(HardExample.device == device)
    return {"count": int(session.scalar(q) or 0)}


@router.get("", response_model=HardExamplesPage)
def list_hard_examples(session: SessionDep, settings: SettingsDep, device: DeviceFilter = None,
                       cursor: Cursor = 0,
                       limit: Limit = 100) -> HardExamplesPage:
    """Hard examples in arrival order (without their input tensors), paged by cursor."""
    limit = min(limit, settings.max_page)
    q = select(HardExample).where(HardExample.n > cursor)
    if device:
        q = q.where(HardExample.device == device)
    rows = list(session.scalars(q.order_by(HardExample.n).limit(limit)))
    return HardExamplesPage(items=[{f: getattr(r, f) for f in _FIELDS} for r in rows],
                            next_cursor=rows[-1].n if len(rows) == limit else None)


@router.get("/{example_id}/input")
def hard_example_input(session: SessionDep, example_id: ItemId) -> Response:
    """The raw input tensor: little-endian bytes, dtype and shape in X-EHI-Dtype/X-EHI-Shape."""
    row = session.scalar(select(HardExample).where(HardExample.id == example_id))
    if row is None:
        raise HTTPException(404, f"no hard example {example_id!r}")
    return Response(row.data, media_type="application/octet-stream",
                    headers={"X-EHI-Dtype": row.dtype,
                             "X-EHI-Shape": ",".join(str(s) for s in row.shape)})
