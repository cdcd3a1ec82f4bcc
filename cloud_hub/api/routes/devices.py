from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel
from sqlalchemy import select

from cloud_hub.api.deps import SessionDep
from cloud_hub.db import Device

router = APIRouter(prefix="/v1/devices", tags=["devices"])


class DeviceOut(BaseModel):
    id: str
    first_seen: float
    last_seen: float
    online: bool
    model: str | None
    backend: str | None
    duplicates: int
    """Copies of results and hard examples this device sent again after the hub had stored
    them (after a lost acknowledgement): counted, never stored twice."""
    telemetry: dict[str, Any] | None


@router.get("", response_model=list[DeviceOut])
def list_devices(session: SessionDep) -> list[Device]:
    """Every device the hub has heard from: last seen, online, model, latest telemetry."""
    return list(session.scalars(select(Device).order_by(Device.id)))


@router.get("/{device_id}", response_model=DeviceOut)
def get_device(device_id: str, session: SessionDep) -> Device:
    dev = session.get(Device, device_id)
    if dev is None:
        raise HTTPException(404, f"unknown device {device_id!r}")
    return dev
