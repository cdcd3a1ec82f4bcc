from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cloud_hub.api.deps import StateDep
from cloud_hub.db import ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: StateDep, response: Response) -> dict[str, object]:
    """Ready to serve: the database answers and, if the bridge runs, it is connected and hears
    the broker (its own heartbeat comes back)."""
    db_ok = ping(state.engine)
    bridge = state.bridge
    mqtt_ok = bridge.connected and not bridge.deaf if bridge is not None else None
    ready = db_ok and mqtt_ok is not False
    if not ready:
        response.status_code = 503
    body: dict[str, object] = {"ready": ready, "database": db_ok, "mqtt": mqtt_ok}
    if bridge is not None:
        body["broker_silence_s"] = round(bridge.silence_s, 1)
    return body


@router.get("/metrics")
def metrics(state: StateDep) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
