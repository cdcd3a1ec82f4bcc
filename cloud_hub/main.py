"""Builds the hub's FastAPI app; its lifespan opens the database, the cloud model and the bridge."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cloud_hub.api import guard
from cloud_hub.api.routes import (
    access,
    devices,
    hard_examples,
    health,
    keys,
    models,
    results,
    rollouts,
    stats,
)
from cloud_hub.artifacts import DatabaseArtifactStore, LocalArtifactStore
from cloud_hub.bridge import Bridge
from cloud_hub.core.config import HubSettings
from cloud_hub.db import check_schema, init_db, make_engine, session_factory
from cloud_hub.errors import HubConfigError
from cloud_hub.metrics import HubMetrics
from cloud_hub.rollouts import RolloutController
from fleet.contract.signing import PrivateKey
from fleet.inference.model import Model
from fleet.transport.tuning import freeze_startup_heap

log = logging.getLogger(__name__)


def create_app(settings: HubSettings | None = None, *, with_bridge: bool = True) -> FastAPI:
    settings = settings or HubSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        if settings.migrate_on_start:
            init_db(engine)
        else:
            check_schema(engine)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        app.state.artifacts = (DatabaseArtifactStore(app.state.sessions)
                               if settings.artifact_store == "database"
                               else LocalArtifactStore(settings.artifacts_dir))
        app.state.hub_key = PrivateKey.read_or_generate(settings.assignment_key)
        app.state.bridge = None
        app.state.rollouts = None
        if with_bridge:
            if settings.cloud_bundle is None:
                raise HubConfigError("no cloud model: set EHI_HUB_CLOUD_BUNDLE to a bundle "
                                     "directory (this repository's: models/bundles/digits-cloud)")
            cloud = Model.open(settings.cloud_bundle, settings.backend, settings.threads)
            m = settings.mqtt
            cfg = m.session_config(f"cloud-hub-{settings.replica_id}")
            bridge = Bridge(cloud, app.state.sessions, app.state.metrics,
                            batch_max=settings.batch_max, batch_wait_ms=settings.batch_wait_ms,
                            offload_queue=settings.offload_queue,
                            ingest_queue=settings.ingest_queue,
                            inline_max_ms=settings.inline_max_ms, mqtt=cfg, shared=m.shared,
                            share_group=m.share_group, replica=settings.replica_id,
                            quotas=settings.device_quota.buckets(),
                            roles=settings.role_set(), stall_s=settings.worker_stall_s)
            bridge.start()
            app.state.bridge = bridge
            controller = RolloutController(app.state.sessions, app.state.hub_key,
                                           bridge.publish_desired, settings.rollout_tick_s,
                                           holder=f"{settings.replica_id}-{uuid.uuid4().hex[:6]}",
                                           metrics=app.state.metrics,
                                           stall_s=settings.worker_stall_s)
            controller.start()
            app.state.rollouts = controller
            log.info("hub %s (%s): cloud model %s on %s, broker %s:%d", settings.replica_id,
                     settings.roles, cloud.manifest.ref, cloud.backend.name, m.host, m.port)
        freeze_startup_heap()
        try:
            yield
        finally:
            if app.state.rollouts is not None:
                app.state.rollouts.stop()
            if app.state.bridge is not None:
                app.state.bridge.stop(settings.shutdown_drain_s)
            engine.dispose()

    app = FastAPI(title="cloud-hub", version="0.1.0", lifespan=lifespan,
                  description="Edge-cloud hybrid inference hub: devices, results, statistics.")
    app.state.settings = settings
    app.state.metrics = HubMetrics()
    app.state.metrics.replica.labels(settings.replica_id).set(1)
    guard.install(app, settings)
    for r in (access.router, health.router, devices.router, results.router, hard_examples.router,
              stats.router, models.router, keys.router, rollouts.router):
        app.include_router(r)
    return app
