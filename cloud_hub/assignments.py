"""Desired models: the hub signs an assignment per device and publishes it, retained.

`seq` grows by one per device with every assignment (the agent refuses anything older than the
newest it accepted). Assigning an older version than the device runs needs a signed rollback
directive in the registry; the hub attaches it to the assignment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cloud_hub.db import DesiredModel, Device, RollbackDirective
from cloud_hub.errors import Conflict, NotFound, StoreError
from cloud_hub.registry import get_model
from fleet.contract import protocol as p
from fleet.contract.assignment import Assignment, OffloadTarget, Reported, encode_desired
from fleet.contract.signing import PrivateKey

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], bool]


def _running_version(dev: Device, name: str) -> int | None:
    if dev.model and "@" in dev.model:
        n, _, v = dev.model.rpartition("@")
        if n == name and v.isdigit():
            return int(v)
    return None


_KEEP = object()


def assign(session: Session, hub_key: PrivateKey, device: str, name: str, version: int,
           publish: Publish, offload: OffloadTarget | object | None = _KEEP) -> DesiredModel:
    """Record and publish `name@version` as the desired model of `device`, with `offload` as
    the device's offload setting (by default the one its previous assignment carried).

    Raises NotFound (device or model), Conflict (an older version without a rollback
    directive)."""
    dev = session.get(Device, device)
    if dev is None:
        raise NotFound(f"unknown device {device!r}: it has never connected to this hub")
    model = get_model(session, name, version)
    rollback = None
    running = _running_version(dev, name)
    if running is not None and version < running:
        row = session.scalar(select(RollbackDirective).where(
            RollbackDirective.name == name, RollbackDirective.from_version == running,
            RollbackDirective.to_version == version))
        if row is None:
            raise Conflict(f"{device} runs {name}@{running}; going back to version {version} "
                           f"needs a signed rollback directive: `fleet models rollback {name} "
                           f"--from {running} --to {version} --key KEY` and upload it")
        rollback = row.document
    for _attempt in range(2):
        desired = session.get(DesiredModel, device, with_for_update=True)
        seq = desired.seq + 1 if desired is not None else 1
        if offload is _KEEP:
            kept = desired.offload if desired is not None else None
            off = OffloadTarget.from_dict(kept) if kept else None
        else:
            assert offload is None or isinstance(offload, OffloadTarget)
            off = offload
        a = Assignment(device, seq, time.time(), model.manifest, rollback, off)
        payload = encode_desired(a, hub_key, dev.wire_version or 1)
        off_doc = off.to_dict() if off is not None else None
        if desired is None:
            desired = DesiredModel(device=device, seq=seq, name=name, version=version,
                                   issued_at=a.issued_at, payload=payload, published=False,
                                   offload=off_doc)
            session.add(desired)
        else:
            desired.seq, desired.name, desired.version = seq, name, version
            desired.issued_at, desired.payload, desired.published = a.issued_at, payload, False
            desired.offload = off_doc
        try:
            session.commit()
            break
        except IntegrityError:  # another replica assigned the same device first: take the next
            session.rollback()
    else:
        raise Conflict(f"{device} is being assigned concurrently; try again")
    if publish(p.topic(device, p.Channel.DESIRED), payload):
        desired.published = True
        session.commit()
    log.info("assigned %s@%d to %s (seq %d, %s)", name, version, device, seq,
             "published" if desired.published else "will publish when the broker is back")
    return desired


def set_offload(session: Session, hub_key: PrivateKey, device: str,
                offload: OffloadTarget | None, publish: Publish) -> DesiredModel:
    """Give `device` an offload setting (None: its own settings again): the assignment of its
    desired model is issued again with it, or, with none assigned yet, an assignment of the
    registry bundle it runs. Raises NotFound, Conflict."""
    dev = session.get(Device, device)
    if dev is None:
        raise NotFound(f"unknown device {device!r}: it has never connected to this hub")
    desired = session.get(DesiredModel, device)
    if desired is not None:
        name, version = desired.name, desired.version
    else:
        running = (dev.model or "").rpartition("@")
        if not running[1] or not running[2].isdigit():
            raise Conflict(f"{device} has reported no model yet; try again once it is online")
        name, version = running[0], int(running[2])
        try:
            get_model(session, name, version)
        except NotFound:
            raise Conflict(f"{device} runs {dev.model}, which is not in the registry: upload "
                           f"it (`fleet models upload`) or assign a model first, then set its "
                           "offload") from None
    return assign(session, hub_key, device, name, version, publish, offload)


def publish_pending(sessions: sessionmaker, publish: Publish) -> int:
    """Publish the assignments the broker has not taken yet (after a reconnect)."""
    n = 0
    try:
        with sessions() as s:
            for d in s.scalars(select(DesiredModel).where(DesiredModel.published.is_(False))):
                if publish(p.topic(d.device, p.Channel.DESIRED), d.payload):
                    d.published = True
                    n += 1
            s.commit()
    except SQLAlchemyError as exc:
        log.error("cannot publish pending assignments: %s", exc)
    return n


def record_reported(sessions: sessionmaker, device: str, r: Reported) -> None:
    try:
        with sessions() as s:
            dev = s.get(Device, device)
            now = time.time()
            if dev is None:
                dev = Device(id=device, first_seen=now, last_seen=now, online=True)
                s.add(dev)
            dev.model = r.model
            dev.update_state, dev.update_target = r.state.value, r.target
            dev.update_error = r.error[:1024] if r.error else None
            dev.update_code, dev.reported_at = r.code, r.ts or now
            if r.fidelity is not None:
                dev.fidelity = r.fidelity
            s.commit()
    except SQLAlchemyError as exc:
        raise StoreError(str(exc)) from None
