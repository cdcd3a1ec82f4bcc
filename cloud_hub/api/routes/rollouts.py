"""Rollouts: create, list, show (per-stage counts, gate values against thresholds), and the
operator's pause, resume, abort and roll back."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from cloud_hub.api.bounds import RowId, StateFilter
from cloud_hub.api.deps import SessionDep, StateDep
from cloud_hub.api.routes.models import error_response
from cloud_hub.db import Rollout, RolloutDevice
from cloud_hub.errors import RegistryError
from cloud_hub.rollout_gates import RolloutPolicy
from cloud_hub.rollouts import create_rollout, get_rollout, stage_report, transition
from fleet.contract.bundle import MAX_VERSION
from fleet.contract.protocol import NAME_PATTERN

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])

_DEFAULTS = RolloutPolicy()


def _default_stages() -> list[str | float]:
    return ["5%", "25%", "100%"]


# A stage's bake or timeout at most (a year), and an increase a gate may allow at most.
MAX_SECONDS = 366 * 86400.0
MAX_RATIO = 1e6


class RolloutIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    model: str = Field(pattern=NAME_PATTERN, max_length=64)
    version: int = Field(ge=1, le=MAX_VERSION)
    selector: str = Field("", max_length=2048)
    stages: list[Annotated[str, Field(max_length=32)] | float] = Field(
        default_factory=_default_stages, min_length=1, max_length=20)
    max_failure: float = Field(_DEFAULTS.max_failure, ge=0, le=1)
    min_reporting: float = Field(_DEFAULTS.min_reporting, gt=0, le=1)
    bake_s: float = Field(_DEFAULTS.bake_s, ge=0, le=MAX_SECONDS)
    min_results: int = Field(_DEFAULTS.min_results, ge=0, le=10**9)
    max_offload_increase: float = Field(_DEFAULTS.max_offload_increase, ge=0, le=MAX_RATIO)
    max_disagreement_increase: float = Field(_DEFAULTS.max_disagreement_increase, ge=0,
                                             le=MAX_RATIO)
    max_p95_increase: float = Field(_DEFAULTS.max_p95_increase, ge=0, le=MAX_RATIO)
    max_rate_per_min: float = Field(_DEFAULTS.max_rate_per_min, ge=0, le=1e9)
    stage_timeout_s: float = Field(_DEFAULTS.stage_timeout_s, gt=0, le=MAX_SECONDS)


def rollout_out(s: Any, r: Rollout, devices: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": r.id, "model": r.name, "version": r.version, "selector": r.selector,
        "state": r.state, "stage": r.stage + 1, "stages": r.stages, "policy": r.policy,
        "reason": r.reason, "created_at": r.created_at, "updated_at": r.updated_at,
        "stage_started_at": r.stage_started_at, "bake_started_at": r.bake_started_at,
        "gates": r.gates, "stage_counts": stage_report(s, r)}
    if devices:
        out["devices"] = [
            {"device": d.device, "stage": d.stage + 1, "state": d.state,
             "previous_model": d.previous_model, "error": d.error}
            for d in s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id)
                               .order_by(RolloutDevice.stage, RolloutDevice.device))]
    return out


@router.post("", status_code=201, responses={404: {}, 409: {}, 422: {}})
def start_rollout(body: RolloutIn, session: SessionDep) -> Any:
    """Roll `model@version` out to the devices `selector` picks, in `stages` (cumulative
    percentages "5%" or counts "#10"), gated as the thresholds say."""
    fields = body.model_dump(exclude={"model", "version", "selector", "stages"})
    policy = RolloutPolicy.from_dict(fields)
    try:
        r = create_rollout(session, body.model, body.version, body.selector, body.stages,
                           policy)
    except RegistryError as exc:
        return error_response(exc)
    return rollout_out(session, r)


@router.get("")
def list_rollouts(session: SessionDep, state: StateFilter = None) -> list[dict[str, Any]]:
    q = select(Rollout).order_by(Rollout.id.desc())
    if state:
        q = q.where(Rollout.state == state)
    return [rollout_out(session, r) for r in session.scalars(q)]


@router.get("/{rollout_id}", responses={404: {}})
def show_rollout(rollout_id: RowId, session: SessionDep, devices: bool = False) -> Any:
    try:
        return rollout_out(session, get_rollout(session, rollout_id), devices)
    except RegistryError as exc:
        return error_response(exc)


def _act(action: str, rollout_id: RowId, session: Any, state: Any) -> Any:
    bridge = state.bridge
    try:
        r = transition(session, rollout_id, action, state.hub_key,
                       bridge.publish_desired if bridge is not None else None)
    except RegistryError as exc:
        state.metrics.rollout_actions.labels(action, "refused").inc()
        return error_response(exc)
    state.metrics.rollout_actions.labels(action, "done").inc()
    return rollout_out(session, r)


@router.post("/{rollout_id}/pause", responses={404: {}, 409: {}})
def pause(rollout_id: RowId, session: SessionDep, state: StateDep) -> Any:
    return _act("pause", rollout_id, session, state)


@router.post("/{rollout_id}/resume", responses={404: {}, 409: {}})
def resume(rollout_id: RowId, session: SessionDep, state: StateDep) -> Any:
    return _act("resume", rollout_id, session, state)


@router.post("/{rollout_id}/abort", responses={404: {}, 409: {}})
def abort(rollout_id: RowId, session: SessionDep, state: StateDep) -> Any:
    """Stop assigning; devices keep what they run."""
    return _act("abort", rollout_id, session, state)


@router.post("/{rollout_id}/rollback", responses={404: {}, 409: {}, 503: {}})
def rollback(rollout_id: RowId, session: SessionDep, state: StateDep) -> Any:
    """Stop, and send every device of the rollout back to the version it ran before."""
    return _act("rollback", rollout_id, session, state)
