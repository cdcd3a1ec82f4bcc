"""Rollouts: a bundle version assigned stage by stage to the devices a label selector picks,
each stage gated on installs and on how the model behaves, halted and reverted on its own.

    pending ──► running (stage k) ──all stages pass──► completed
                  │  ▲      │
           pause  ▼  │ resume│ a gate fails: the stage's devices go back to their previous
                 paused      │ version (reverting → reverted)
                  │          ▼
                  └─abort──► halted ◄── abort (no revert)
    any but completed ──rollback──► rolled_back (every device of the rollout goes back)

Everything lives in the database; the controller (one per hub fleet, chosen by a lease) steps
each rollout from what the database says, so a restarted hub continues where it was.
Membership: devices are ordered by a hash of (rollout, device), so a stage's share is stable
while devices join; stage k holds the first ceil(p_k * N) (or count_k) of the N devices the
selector matches now, so devices that register during the rollout join it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cloud_hub import latency_sketch, rollups
from cloud_hub.assignments import assign
from cloud_hub.db import Device, Lease, RollbackDirective, Rollout, RolloutDevice
from cloud_hub.errors import Conflict, Invalid, NotFound, RegistryError, Unavailable
from cloud_hub.metrics import HubMetrics
from cloud_hub.registry import get_model
from cloud_hub.rollout_gates import Figures, RolloutPolicy, judge_stage
from cloud_hub.supervisor import STALL_S, Worker
from fleet.contract.selectors import Selector, SelectorError, parse_selector
from fleet.contract.signing import PrivateKey

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], bool]

LEASE_NAME = "rollout-controller"
# A controller that stops renewing its lease (crash, partition) is replaced after this long.
LEASE_TTL_S = 10.0


class State(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    ROLLED_BACK = "rolled_back"
    COMPLETED = "completed"


# Rollouts that own their devices: another rollout may not target them.
ACTIVE = (State.PENDING.value, State.RUNNING.value, State.PAUSED.value)


class DeviceState(StrEnum):
    ASSIGNED = "assigned"
    INSTALLED = "installed"
    FAILED = "failed"
    REVERTING = "reverting"
    REVERTED = "reverted"
    REVERT_FAILED = "revert_failed"
    SKIPPED = "skipped"      # the hub could not assign it (e.g. it runs a newer version)


# ---------------------------------------------------------------------------- stages


def parse_stages(spec: Sequence[str | int | float]) -> list[dict[str, float]]:
    """`["5%", "25%", "100%"]` or `[5, 25, 100]` (percent) or `["10", "50"]`... counts are
    written as plain integers in strings with a `#`: `"#10"`. Cumulative, increasing."""
    out: list[dict[str, float]] = []
    for raw in spec:
        s = str(raw).strip()
        try:
            if s.startswith("#"):
                out.append({"count": int(s[1:])})
            else:
                out.append({"percent": float(s.rstrip("%"))})
        except ValueError:
            raise Invalid(f"stage {raw!r} is neither a percentage (5%) nor a count "
                                 "(#10)") from None
    if not out:
        raise Invalid("a rollout needs at least one stage")
    for st in out:
        v = st.get("percent", st.get("count", 0))
        if v <= 0 or ("percent" in st and v > 100):
            raise Invalid(f"stage {st} must be above 0 (and at most 100%)")
    return out


def stage_targets(stages: list[dict[str, float]], n: int) -> list[int]:
    """Cumulative device counts of each stage for `n` matching devices (never decreasing; the
    last stage of percentages reaches everyone at 100%)."""
    out, prev = [], 0
    for st in stages:
        t = (math.ceil(st["percent"] / 100.0 * n) if "percent" in st
             else min(int(st["count"]), n))
        prev = max(prev, t)
        out.append(prev)
    return out


def _order_key(rollout_id: int, device: str) -> str:
    return hashlib.sha256(f"{rollout_id}:{device}".encode()).hexdigest()


def _ref_version(ref: str | None, name: str) -> int | None:
    if ref and "@" in ref:
        n, _, v = ref.rpartition("@")
        if n == name and v.isdigit():
            return int(v)
    return None


# ---------------------------------------------------------------------------- queries


def matching_devices(s: Session, selector: Selector) -> list[Device]:
    return [d for d in s.scalars(select(Device).order_by(Device.id))
            if selector.matches(d.effective_labels())]


def _claimed_elsewhere(s: Session, rollout_id: int | None) -> set[str]:
    q = (select(RolloutDevice.device).join(Rollout, Rollout.id == RolloutDevice.rollout_id)
         .where(Rollout.state.in_(ACTIVE)))
    if rollout_id is not None:
        q = q.where(Rollout.id != rollout_id)
    return set(s.scalars(q))


def figures(s: Session, devices: list[str], models: list[str], since: float | None = None
            ) -> Figures:
    """How `devices` behaved on `models` since `since` (to the minute: cloud_hub/rollups.py),
    from the running sums."""
    if not devices or not models:
        return Figures(0, None, None, None)
    sums = rollups.read(s, devices=devices, models=models, since=since, by_group=False)
    if not sums.groups:
        return Figures(0, None, None, None)
    n, off, answered, agree, _, _ = (int(x) for x in sums.counts[0])
    return Figures(n, off / n if n else None,
                   (answered - agree) / answered if answered else None,
                   latency_sketch.percentile(sums.hist[0].sum(axis=0), 95, sums.lo), answered)


# ---------------------------------------------------------------------------- operations


def create_rollout(s: Session, name: str, version: int, selector_text: str,
                   stages: Sequence[str | int | float], policy: RolloutPolicy) -> Rollout:
    """Check and record a rollout (it starts on the controller's next step).

    Raises NotFound (no such model), Invalid (bad selector or stages), Conflict
    (devices already in an active rollout, or a revert that would need a missing directive).
    """
    get_model(s, name, version)
    try:
        selector = parse_selector(selector_text)
    except SelectorError as exc:
        raise Invalid(str(exc)) from None
    parsed = parse_stages(stages)
    devices = matching_devices(s, selector)
    for other in s.scalars(select(Rollout).where(Rollout.state.in_(ACTIVE))):
        theirs = {d.id for d in matching_devices(s, parse_selector(other.selector))}
        theirs |= set(s.scalars(select(RolloutDevice.device).where(
            RolloutDevice.rollout_id == other.id)))
        both = sorted(theirs & {d.id for d in devices})
        if both:
            raise Conflict(f"rollout {other.id} ({other.name}@{other.version}, "
                           f"{other.state}) already targets {len(both)} of these devices "
                           f"(e.g. {', '.join(both[:3])}): pause and abort it, or narrow the "
                           "selector")
    missing = sorted({v for d in devices if (v := _ref_version(d.model, name)) is not None
                      and v < version and not s.scalar(select(RollbackDirective.n).where(
                          RollbackDirective.name == name,
                          RollbackDirective.from_version == version,
                          RollbackDirective.to_version == v))})
    if missing:
        raise Conflict(
            f"reverting to {', '.join(f'{name}@{v}' for v in missing)} would need signed "
            f"rollback directives; sign them first: " + "; ".join(
                f"fleet models rollback {name} --from {version} --to {v} --key KEY --hub URL"
                for v in missing) + " (or pass --key to fleet rollout start)")
    now = time.time()
    r = Rollout(name=name, version=version, selector=selector.text, stages=parsed,
                policy=policy.to_dict(), state=State.PENDING.value, stage=0, created_at=now,
                updated_at=now)
    s.add(r)
    s.commit()
    log.info("rollout %d created: %s@%d to %r in stages %s", r.id, name, version,
             selector.text, parsed)
    return r


_TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "pause": ((State.PENDING.value, State.RUNNING.value), State.PAUSED.value),
    "resume": ((State.PAUSED.value,), State.RUNNING.value),
    "abort": ((State.PENDING.value, State.RUNNING.value, State.PAUSED.value), State.HALTED.value),
    "rollback": ((State.PENDING.value, State.RUNNING.value, State.PAUSED.value,
                  State.HALTED.value), State.ROLLED_BACK.value),
}


def get_rollout(s: Session, rollout_id: int) -> Rollout:
    r = s.get(Rollout, rollout_id)
    if r is None:
        raise NotFound(f"no rollout {rollout_id}")
    return r


def transition(s: Session, rollout_id: int, action: str, hub_key: PrivateKey | None = None,
               publish: Publish | None = None) -> Rollout:
    """pause | resume | abort | rollback, by an operator. Raises Conflict when the rollout's
    state does not allow it."""
    r = get_rollout(s, rollout_id)
    allowed, to = _TRANSITIONS[action]
    if r.state not in allowed:
        raise Conflict(f"rollout {r.id} is {r.state}: cannot {action} it "
                       f"(only when {', '.join(allowed)})")
    r.state, r.updated_at = to, time.time()
    if action == "abort":
        r.reason = "aborted by an operator"
    if action == "rollback":
        if hub_key is None or publish is None:
            raise Unavailable("rolling back needs the hub's MQTT bridge")
        r.reason = "rolled back by an operator"
        rows = list(s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id)))
        _revert(s, r, rows, hub_key, publish)
    s.commit()
    log.info("rollout %d: %s -> %s", r.id, action, r.state)
    return r


def _revert(s: Session, r: Rollout, rows: list[RolloutDevice], hub_key: PrivateKey,
            publish: Publish) -> int:
    """Assign each row's device its previous version; the number assigned."""
    n = 0
    for row in rows:
        if row.state in (DeviceState.REVERTED.value, DeviceState.REVERTING.value,
                         DeviceState.SKIPPED.value):
            continue
        prev = _ref_version(row.previous_model, r.name)
        if prev is None:
            row.state = DeviceState.REVERT_FAILED.value
            row.error = (f"ran {row.previous_model or 'nothing known'} before: no version of "
                         f"{r.name} to go back to")
            continue
        try:
            assign(s, hub_key, row.device, r.name, prev, publish)
        except RegistryError as exc:  # refused before anything was written
            row.state, row.error = DeviceState.REVERT_FAILED.value, str(exc)[:1024]
            log.error("rollout %d: cannot revert %s: %s", r.id, row.device, exc)
            continue
        row.state = DeviceState.REVERTING.value
        n += 1
    return n


def stage_report(s: Session, r: Rollout) -> list[dict[str, Any]]:
    """Per stage: how many devices it holds and how their installs went."""
    counts: dict[tuple[int, str], int] = {
        (int(st), str(state)): int(n) for st, state, n in s.execute(
            select(RolloutDevice.stage, RolloutDevice.state, func.count())
            .where(RolloutDevice.rollout_id == r.id)
            .group_by(RolloutDevice.stage, RolloutDevice.state))}
    n = len(matching_devices(s, parse_selector(r.selector)))
    targets = stage_targets(r.stages, n)
    out = []
    prev = 0
    for k, st in enumerate(r.stages):
        row: dict[str, Any] = {"stage": k + 1, "spec": st, "devices": targets[k] - prev,
                               "cumulative": targets[k]}
        for ds in DeviceState:
            row[ds.value] = counts.get((k, ds.value), 0)
        row["status"] = ("done" if k < r.stage or r.state == State.COMPLETED.value
                         else "current" if k == r.stage else "waiting")
        out.append(row)
        prev = targets[k]
    return out


# ---------------------------------------------------------------------------- the controller


class RolloutController:
    """Steps every rollout on a timer, in the replica that holds the lease."""

    def __init__(self, sessions: sessionmaker, hub_key: PrivateKey, publish: Publish,
                 tick_s: float, holder: str | None = None,
                 metrics: HubMetrics | None = None, stall_s: float = STALL_S) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.hub_key = hub_key
        self.publish = publish
        self.tick_s = tick_s
        self.holder = holder or f"hub-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        # Supervised (cloud_hub/supervisor.py): no exception ends it, and /readyz sees a hang.
        self.worker = Worker("rollouts", self._tick, self._stop, metrics,
                             stall_s=max(stall_s, 10 * tick_s))
        self._first = True

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self._stop.set()
        self.worker.join(timeout=10)

    def _tick(self) -> float:
        """One round: take or renew the lease, step every rollout if this replica leads."""
        if self._first:  # the first round comes one tick after the start, as every other
            self._first = False
            return self.tick_s
        try:
            leading = self.lead()
            if self.metrics is not None:
                self.metrics.rollout_leader.set(1 if leading else 0)
            if leading:
                self.step_all()
        except SQLAlchemyError as exc:
            log.error("rollout controller: database error (retrying): %s", exc)
        return self.tick_s

    def lead(self, now: float | None = None) -> bool:
        """Take or renew the lease; True if this replica runs the rollouts."""
        now = now or time.time()
        with self.sessions() as s:
            lease = s.get(Lease, LEASE_NAME, with_for_update=True)
            if lease is None:
                s.add(Lease(name=LEASE_NAME, holder=self.holder, expires_at=now + LEASE_TTL_S))
            elif lease.holder == self.holder or lease.expires_at < now:
                lease.holder, lease.expires_at = self.holder, now + LEASE_TTL_S
            else:
                return False
            try:
                s.commit()
            except IntegrityError:
                return False
        return True

    def step_all(self, now: float | None = None) -> None:
        with self.sessions() as s:
            reverting = select(RolloutDevice.rollout_id).where(
                RolloutDevice.state == DeviceState.REVERTING.value)
            ids = list(s.scalars(select(Rollout.id).where(
                Rollout.state.in_((State.PENDING.value, State.RUNNING.value))
                | Rollout.id.in_(reverting)).order_by(Rollout.id)))
        for rid in ids:
            with self.sessions() as s:
                self.step(s, s.get(Rollout, rid), now or time.time())
        if self.metrics is not None:
            with self.sessions() as s:
                counts = dict(s.execute(select(Rollout.state, func.count())
                                        .group_by(Rollout.state)).all())
            for st in State:
                self.metrics.rollouts.labels(st.value).set(counts.get(st.value, 0))

    def step(self, s: Session, r: Rollout | None, now: float) -> None:
        if r is None:
            return
        rows = {row.device: row for row in s.scalars(
            select(RolloutDevice).where(RolloutDevice.rollout_id == r.id))}
        devices = {d.id: d for d in s.scalars(select(Device).where(Device.id.in_(list(rows))))}
        ref = f"{r.name}@{r.version}"
        self._track(rows, devices, ref, now)
        if r.state == State.PENDING.value:
            r.state, r.stage, r.stage_started_at = State.RUNNING.value, 0, now
        if r.state == State.RUNNING.value:
            self._run(s, r, rows, ref, now)
        r.updated_at = now
        s.commit()

    def _track(self, rows: dict[str, RolloutDevice], devices: dict[str, Device], ref: str,
               now: float) -> None:
        """Move each device's row along from what the device reported."""
        for name, row in rows.items():
            d = devices.get(name)
            if d is None:
                continue
            reported_after = (d.reported_at or 0.0) >= row.assigned_at
            if row.state == DeviceState.ASSIGNED.value:
                if d.model == ref:
                    row.state, row.installed_at = DeviceState.INSTALLED.value, now
                elif (reported_after and d.update_target == ref
                      and d.update_state in ("failed", "refused", "reverted")):
                    row.state = DeviceState.FAILED.value
                    row.error = f"{d.update_state} ({d.update_code}): {d.update_error}"[:1024]
            elif row.state == DeviceState.REVERTING.value and d.model == row.previous_model:
                row.state = DeviceState.REVERTED.value

    def _run(self, s: Session, r: Rollout, rows: dict[str, RolloutDevice], ref: str,
             now: float) -> None:
        policy = RolloutPolicy.from_dict(r.policy)
        claimed = _claimed_elsewhere(s, r.id)
        pool = [d for d in matching_devices(s, parse_selector(r.selector))
                if d.id not in claimed or d.id in rows]
        pool.sort(key=lambda d: _order_key(r.id, d.id))
        targets = stage_targets(r.stages, len(pool))
        members = pool[:targets[r.stage]] if pool else []
        budget = self._budget(s, policy, now)
        for d in members:
            if d.id in rows:
                continue
            if budget <= 0:
                break
            try:
                assign(s, self.hub_key, d.id, r.name, r.version, self.publish)
            except RegistryError as exc:  # e.g. it runs a newer version: left out, said why
                log.warning("rollout %d: leaving %s out: %s", r.id, d.id, exc)
                row = RolloutDevice(rollout_id=r.id, device=d.id, stage=r.stage,
                                    previous_model=d.model, state=DeviceState.SKIPPED.value,
                                    assigned_at=now, error=str(exc)[:1024])
                s.add(row)
                rows[d.id] = row
                continue
            row = RolloutDevice(rollout_id=r.id, device=d.id, stage=r.stage,
                                previous_model=d.model, state=DeviceState.ASSIGNED.value,
                                assigned_at=now)
            if d.model == ref:  # already runs it (e.g. a resumed rollout)
                row.state, row.installed_at = DeviceState.INSTALLED.value, now
            s.add(row)
            rows[d.id] = row
            budget -= 1
            self._count("assign")
        stage_rows = [row for row in rows.values() if row.stage == r.stage
                      and row.state != DeviceState.SKIPPED.value]
        unassigned = sum(1 for d in members if d.id not in rows)
        if unassigned or not members:
            return  # still assigning (rate limit), or no devices yet
        if not stage_rows:  # this stage adds nobody (few devices): nothing to judge
            self._advance(r, now)
            return
        n = len(stage_rows)
        installed = sum(1 for x in stage_rows if x.state == DeviceState.INSTALLED.value)
        failed = sum(1 for x in stage_rows if x.state == DeviceState.FAILED.value)
        names = [x.device for x in stage_rows]
        prev_refs = sorted({x.previous_model for x in stage_rows
                            if x.previous_model and x.previous_model != ref})
        base = figures(s, names, prev_refs, (r.stage_started_at or now)
                       - policy.baseline_window_s)
        new = figures(s, [x.device for x in stage_rows
                          if x.state == DeviceState.INSTALLED.value], [ref])
        if r.bake_started_at is None and n and (installed + failed) / n >= policy.min_reporting:
            r.bake_started_at = now
        baked = None if r.bake_started_at is None else now - r.bake_started_at
        v = judge_stage(n, installed, failed, base, new, baked,
                        now - (r.stage_started_at or now), policy)
        r.gates = {"stage": r.stage + 1, "decision": v.decision,
                   "baseline_results": base.results, "gates": [g.to_dict() for g in v.gates]}
        if v.decision == "pass":
            self._judged("passed", "")
            self._advance(r, now)
        elif v.decision == "fail":
            r.state, r.reason = State.HALTED.value, f"stage {r.stage + 1}: {v.reason}"
            log.warning("rollout %d halted at stage %d: %s; reverting its %d devices", r.id,
                        r.stage + 1, v.reason, n)
            self._judged("halted", "+".join(g.name for g in v.gates if g.passed is False)
                         or "stage_timeout")
            self._count("revert", _revert(s, r, stage_rows, self.hub_key, self.publish))

    def _count(self, kind: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            self.metrics.rollout_assignments.labels(kind).inc(n)

    def _judged(self, decision: str, gate: str) -> None:
        if self.metrics is not None:
            self.metrics.rollout_stages.labels(decision, gate).inc()

    def _advance(self, r: Rollout, now: float) -> None:
        if r.stage + 1 >= len(r.stages):
            r.state = State.COMPLETED.value
            log.info("rollout %d completed", r.id)
        else:
            r.stage += 1
            r.stage_started_at, r.bake_started_at = now, None
            log.info("rollout %d: stage %d passed, on to stage %d", r.id, r.stage, r.stage + 1)

    def _budget(self, s: Session, p: RolloutPolicy, now: float) -> float:
        if p.max_rate_per_min <= 0:
            return math.inf
        recent = s.scalar(select(func.count()).select_from(RolloutDevice).where(
            RolloutDevice.assigned_at >= now - 60.0)) or 0
        return p.max_rate_per_min - recent

