from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from cloud_hub.api.bounds import DeviceId
from cloud_hub.api.deps import SessionDep, StateDep
from cloud_hub.api.routes.models import error_response
from cloud_hub.assignments import assign, set_offload
from cloud_hub.db import DesiredModel, Device
from cloud_hub.errors import Invalid, NotFound, RegistryError, Unavailable
from cloud_hub.rollouts import matching_devices
from fleet.contract.assignment import OffloadTarget
from fleet.contract.bundle import MAX_VERSION
from fleet.contract.protocol import NAME_PATTERN
from fleet.contract.selectors import SelectorError, label_problems, parse_selector

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
    update_state: str | None
    """The device's own report: idle, downloading, verifying, checking, activating, refused,
    failed, reverted."""
    update_target: str | None
    update_error: str | None
    update_code: str | None
    reported_at: float | None
    labels: dict[str, str]
    """The labels rollouts select on: those the device reports, overlaid with those set here."""
    fidelity: dict[str, Any] | None
    """The fidelity check of the model it runs, on its serving backend: top-1 agreement with
    the bundle's reference and the floor, offload at the manifest threshold, the threshold it
    calibrated for the bundle's budget, its CPU, and the backends it refused and why."""
    offload: dict[str, Any] | None
    """Its offloading, from telemetry: mode, target, threshold, recent rate, drift."""
    offload_setting: dict[str, Any] | None
    """The offload setting the hub gave it (`PUT /v1/devices/{id}/offload`); null: its own."""


class LabelsIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    # A value of null removes the label.
    labels: dict[str, str | None]


class DesiredIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    model: str = Field(pattern=NAME_PATTERN, max_length=64)
    version: int = Field(ge=1, le=MAX_VERSION)


class DesiredOut(BaseModel):
    device: str
    model: str
    version: int
    seq: int
    issued_at: float
    published: bool


class OffloadIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    mode: Literal["threshold", "budget"]
    # The share of inputs to offload in budget mode; null: the bundle's offload budget.
    target: float | None = Field(None, gt=0, lt=1)
    # A byte budget for metered links (offload payloads per second); null: none.
    max_bytes_per_s: float | None = Field(None, gt=0, le=1e12)


def _out(d: Device, desired: DesiredModel | None = None) -> dict[str, Any]:
    """A device as the API shows it (`desired` gives its offload setting)."""
    out = {c: getattr(d, c) for c in DeviceOut.model_fields
           if c not in ("labels", "offload_setting")}
    out["labels"] = d.effective_labels()
    out["offload_setting"] = desired.offload if desired is not None else None
    return out


@router.get("", response_model=list[DeviceOut], responses={422: {}})
def list_devices(session: SessionDep, selector: str | None = None) -> Any:
    """Every device the hub has heard from (or those a label `selector` picks, e.g.
    `site=berlin,hw=rpi4`): last seen, online, model, update state, labels, telemetry."""
    if selector:
        try:
            sel = parse_selector(selector)
        except SelectorError as exc:
            return error_response(Invalid(str(exc)))
        devices = list(matching_devices(session, sel))
    else:
        devices = list(session.scalars(select(Device).order_by(Device.id)))
    settings = {d: o for d, o in session.execute(select(DesiredModel.device, DesiredModel.offload)
                                                 .where(DesiredModel.offload.is_not(None)))}
    return [{**_out(d), "offload_setting": settings.get(d.id)} for d in devices]


@router.put("/{device_id}/labels", response_model=DeviceOut, responses={404: {}, 422: {}})
def set_labels(device_id: DeviceId, body: LabelsIn, session: SessionDep) -> Any:
    """Set (or, with null, remove) operator labels; they override what the device reports."""
    dev = session.get(Device, device_id)
    if dev is None:
        return error_response(NotFound(f"unknown device {device_id!r}"))
    labels = dict(dev.labels or {})
    for k, v in body.labels.items():
        if v is None:
            labels.pop(k, None)
        else:
            labels[k] = v
    bad = label_problems(body.labels) or label_problems(labels)
    if bad:
        return error_response(Invalid("; ".join(bad)))
    dev.labels = labels
    session.commit()
    return _out(dev)


@router.put("/{device_id}/desired", response_model=DesiredOut,
            responses={404: {}, 409: {}, 503: {}})
def set_desired(device_id: DeviceId, body: DesiredIn, session: SessionDep, state: StateDep) -> Any:
    """Assign a registry bundle to a device: the hub signs the assignment and publishes it,
    retained, on the device's `desired` topic (an offline device gets it when it returns)."""
    if state.bridge is None:
        return error_response(Unavailable("this hub runs without its MQTT bridge: it cannot "
                                            "publish assignments"))
    try:
        d = assign(session, state.hub_key, device_id, body.model, body.version,
                   state.bridge.publish_desired)
    except RegistryError as exc:
        return error_response(exc)
    return DesiredOut(device=d.device, model=d.name, version=d.version, seq=d.seq,
                      issued_at=d.issued_at, published=d.published)


@router.get("/{device_id}/desired", response_model=DesiredOut, responses={404: {}})
def get_desired(device_id: DeviceId, session: SessionDep) -> Any:
    d = session.get(DesiredModel, device_id)
    if d is None:
        return error_response(NotFound(f"no model assigned to {device_id!r}"))
    return DesiredOut(device=d.device, model=d.name, version=d.version, seq=d.seq,
                      issued_at=d.issued_at, published=d.published)


@router.put("/{device_id}/offload", response_model=DesiredOut,
            responses={404: {}, 409: {}, 503: {}})
def put_offload(device_id: DeviceId, body: OffloadIn, session: SessionDep, state: StateDep) -> Any:
    """Set how a device offloads: `{"mode": "budget", "target": 0.15}` makes its controller keep
    15% of its inputs offloaded (`target` null: the bundle's budget; `max_bytes_per_s` caps the
    bytes); `{"mode": "threshold"}` a fixed threshold. Travels in the device's signed
    assignment, so it holds across restarts and rollouts."""
    return _put_offload(device_id, OffloadTarget(body.mode, body.target, body.max_bytes_per_s),
                        session, state)


@router.delete("/{device_id}/offload", response_model=DesiredOut,
               responses={404: {}, 409: {}, 503: {}})
def delete_offload(device_id: DeviceId, session: SessionDep, state: StateDep) -> Any:
    """Give the device back its own offload settings."""
    return _put_offload(device_id, None, session, state)


def _put_offload(device_id: DeviceId, target: OffloadTarget | None, session: SessionDep,
                 state: StateDep) -> Any:
    if state.bridge is None:
        return error_response(Unavailable("this hub runs without its MQTT bridge: it cannot "
                                            "publish assignments"))
    try:
        d = set_offload(session, state.hub_key, device_id, target, state.bridge.publish_desired)
    except RegistryError as exc:
        return error_response(exc)
    return DesiredOut(device=d.device, model=d.name, version=d.version, seq=d.seq,
                      issued_at=d.issued_at, published=d.published)


@router.get("/{device_id}", response_model=DeviceOut)
def get_device(device_id: DeviceId, session: SessionDep) -> Any:
    """One device: its model, update state, labels, telemetry, the fidelity figures of its
    model on its backend, and its offloading (mode, target, threshold, drift)."""
    dev = session.get(Device, device_id)
    if dev is None:
        raise HTTPException(404, f"unknown device {device_id!r}")
    return _out(dev, session.get(DesiredModel, device_id))
