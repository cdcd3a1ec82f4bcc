from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from cloud_hub.api.deps import StateDep
from cloud_hub.db import Device, ping
from cloud_hub.supervisor import problems

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: StateDep, response: Response) -> dict[str, object]:
    """Ready to serve: the database answers and, if the bridge runs, it is connected, hears the
    broker (its own heartbeat comes back) and every worker runs and makes progress
    (`workers` names the ones that do not, and why)."""
    db_ok = ping(state.engine)
    bridge = state.bridge
    mqtt_ok = bridge.connected and not bridge.deaf if bridge is not None else None
    stuck = worker_problems(state)
    ready = db_ok and mqtt_ok is not False and not stuck
    if not ready:
        response.status_code = 503
    body: dict[str, object] = {"ready": ready, "database": db_ok, "mqtt": mqtt_ok,
                               "workers": stuck or "ok"}
    if bridge is not None:
        body["broker_silence_s"] = round(bridge.silence_s, 1)
    return body


def worker_problems(state: Any) -> dict[str, str]:
    """The hub's workers that have ended or stalled (sets `ehi_hub_worker_up` too)."""
    workers = []
    if state.bridge is not None:
        workers += state.bridge.workers
    if state.rollouts is not None:
        workers.append(state.rollouts.worker)
    return problems(workers, state.metrics)


@router.get("/metrics")
def metrics(state: StateDep) -> Response:
    """Prometheus metrics."""
    worker_problems(state)
    try:
        with state.sessions() as s:
            rows = dict(s.execute(select(Device.online, func.count()).group_by(Device.online))
                        .all())
        state.metrics.devices.labels("online").set(rows.get(True, 0))
        state.metrics.devices.labels("offline").set(rows.get(False, 0))
    except SQLAlchemyError:
        pass  # the database's own health is /readyz's; the other metrics still answer
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
