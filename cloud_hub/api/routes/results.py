from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import func, select

from cloud_hub.api.bounds import Cursor, DeviceFilter, Epoch, Limit
from cloud_hub.api.deps import SessionDep, SettingsDep
from cloud_hub.db import RESULT_FIELDS, Result, filter_results

router = APIRouter(prefix="/v1/results", tags=["results"])


class ResultsPage(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: int | None
    """Pass as `cursor` to get the next page; null on the last page."""


@router.get("/count")
def count_results(session: SessionDep, device: DeviceFilter = None, since: Epoch = None,
                  until: Epoch = None, offloaded: bool | None = None) -> dict[str, int]:
    """How many result records match (cheap: for progress and monitoring)."""
    q = filter_results(select(func.count()).select_from(Result), device, since, until)
    if offloaded is not None:
        q = q.where(Result.offloaded == offloaded)
    return {"count": int(session.scalar(q) or 0)}


@router.get("", response_model=ResultsPage)
def list_results(session: SessionDep, settings: SettingsDep,
                 device: DeviceFilter = None,
                 since: Epoch = None,  # ts >= since (epoch s)
                 until: Epoch = None,  # ts < until (epoch s)
                 offloaded: bool | None = None,
                 cursor: Cursor = 0,
                 limit: Limit = 100) -> ResultsPage:
    """Result records in arrival order, paged by cursor."""
    limit = min(limit, settings.max_page)
    q = filter_results(select(Result).where(Result.n > cursor), device, since, until)
    if offloaded is not None:
        q = q.where(Result.offloaded == offloaded)
    rows = list(session.scalars(q.order_by(Result.n).limit(limit)))
    items = [{f: getattr(r, f) for f in RESULT_FIELDS} | {"received_at": r.received_at}
             for r in rows]
    return ResultsPage(items=items, next_cursor=rows[-1].n if len(rows) == limit else None)
