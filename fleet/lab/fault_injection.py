"""A fleet under fire: broker, hub and agents as real processes, inputs at a fixed rate through
the agents' local APIs, and faults injected on a schedule (broker outage, `kill -9` of agents and
of the hub). Afterwards the hub's database is counted against every answer the applications got.

`bench/faults.py` runs the full scenario; the test suite runs a smaller one.
"""

from __future__ import annotations

import http.client
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import write_settings
from fleet.contract.errors import FleetError
from fleet.lab.brokers import RunningBroker, start_broker
from fleet.lab.processes import (
    ManagedProcess,
    ProcessGroup,
    start_hub,
    wait_for_port,
    work_folder,
)
from fleet.transport.ports import free_port
from models import EDGE_BUNDLE, STREAMS_FILE

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
# A request to an agent's local API; an agent answers within its offload deadline (200 ms).
REQUEST_TIMEOUT_S = 10.0
# While an agent is down, its driver retries the connection this often.
RETRY_S = 0.05
POLL_S = 0.25
# After the drain: resends still in flight arrive, so duplicates on the wire are all counted.
SETTLE_S = 2.0
# How often the hub's database is looked at to time the catch-up after each recovery.
CATCH_UP_POLL_S = 0.5


@dataclass(frozen=True)
class FaultPlan:
    """When (seconds after the traffic starts) each fault is injected, and for how long."""

    agent_kills: tuple[float, ...] = (12.0, 80.0)
    broker_outage_at: float = 25.0
    broker_outage_s: float = 30.0
    hub_kill_at: float = 65.0
    # A killed agent is started again after this long.
    restart_after_s: float = 1.0
    # The hub stays down this long after its kill -9: what the devices' resends cost while
    # nobody acknowledges (`hub_outage` in the report: resends per entry owed).
    hub_down_s: float = 45.0


@dataclass(frozen=True)
class ScenarioOptions:
    agents: int = 4
    results: int = 10_000  # answers the applications must get, in total
    rate_hz: float = 25.0  # inputs per second per agent
    plan: FaultPlan = field(default_factory=FaultPlan)
    drain_timeout_s: float = 180.0
    workdir: Path | None = None
    keep: bool = False
    backend: str = "onnxruntime"
    # The hub's database; None: a SQLite file in the workdir.
    database_url: str | None = None
    # Extra agent settings under [results], e.g. a shorter resend time in tests.
    results_settings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Driver:
    """Feeds one agent's local API at a fixed rate and records every answer it gets."""

    index: int
    port: int
    quota: int
    rate_hz: float
    inputs: np.ndarray
    in_outage: Callable[[float], bool]
    answered: list[tuple[str, bool]] = field(default_factory=list)  # id, degraded
    refused: int = 0  # no answer: the agent down (refused, dropped) or a timeout
    errors: list[str] = field(default_factory=list)  # answers other than 200
    outage_submitted: int = 0
    outage_answered: int = 0
    last_answer_at: float = 0.0

    def run(self, t0: float, stop: threading.Event) -> None:
        conn: http.client.HTTPConnection | None = None
        k = 0
        while len(self.answered) < self.quota and not stop.is_set():
            due = t0 + k / self.rate_hz
            delay = due - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            k += 1
            x = self.inputs[k % len(self.inputs)]
            outage = self.in_outage(time.monotonic() - t0)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                      timeout=REQUEST_TIMEOUT_S)
                conn.request("POST", "/v1/infer", x.tobytes(), {
                    "Content-Type": "application/octet-stream", "X-EHI-Dtype": x.dtype.name,
                    "X-EHI-Shape": ",".join(map(str, x.shape)),
                    "X-EHI-Input-Ref": f"faults/{self.index}/{k}"})
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                self.refused += 1
                # A refused or reset connection is an agent the scenario killed: nothing reached
                # it. A timeout reached a running agent that did not answer: that counts.
                if outage and not isinstance(exc, ConnectionRefusedError | ConnectionResetError
                                             | http.client.RemoteDisconnected):
                    self.outage_submitted += 1
                stop.wait(RETRY_S)
                continue
            if outage:
                self.outage_submitted += 1
            if resp.status != 200:
                self.errors.append(f"{resp.status}: {body[:200]!r}")
                continue
            a = json.loads(body)
            self.answered.append((a["id"], bool(a["degraded"])))
            self.last_answer_at = time.monotonic()
            if outage:
                self.outage_answered += 1
        if conn is not None:
            conn.close()


class _Fleet:
    def __init__(self, o: ScenarioOptions, group: ProcessGroup, workdir: Path) -> None:
        self.o = o
        self.group = group
        self.workdir = workdir
        self.db_url = o.database_url or f"sqlite:///{workdir / 'hub.db'}"
        self.db = _HubDb(self.db_url)
        self.broker: RunningBroker = start_broker(group, workdir, "mosquitto")
        self.hub_port = free_port()
        self.hub: ManagedProcess = self._start_hub()
        self.agent_ports = [free_port() for _ in range(o.agents)]
        self.agents = [self._start_agent(i) for i in range(o.agents)]
        for i, a in enumerate(self.agents):
            if not wait_for_port(self.agent_ports[i], START_TIMEOUT_S, a.proc):
                raise FleetError(f"agent {i} did not start:\n{a.tail()}")

    def _start_hub(self) -> ManagedProcess:
        n = sum(1 for p in self.group.procs if p.name == "hub")
        return start_hub(self.group, self.workdir, port=self.hub_port,
                         broker_port=self.broker.port, log_path=self.workdir / f"hub-{n}.log",
                         database_url=self.db_url, env={"EHI_HUB_BACKEND": self.o.backend})

    def _start_agent(self, i: int) -> ManagedProcess:
        cfg = self.workdir / f"agent-{i}.toml"
        if not cfg.exists():
            write_settings(cfg, {
                "device_id": f"faults-{i}", "bundle": EDGE_BUNDLE, "backend": self.o.backend,
                "telemetry_interval_s": 1.0, "mqtt": {"port": self.broker.port},
                "local_api": {"port": self.agent_ports[i]},
                "results": {"outbox_dir": self.workdir / f"outbox-{i}",
                            **self.o.results_settings}})
        n = sum(1 for p in self.group.procs if p.name == f"agent-{i}")
        return self.group.start(f"agent-{i}", [sys.executable, "-m", "edge_agent.cli", "run",
                                               "--config", str(cfg)],
                                self.workdir / f"agent-{i}-{n}.log")

    def kill_agent(self, i: int) -> None:
        self.agents[i].kill()

    def restart_agent(self, i: int) -> None:
        self.agents[i] = self._start_agent(i)

    def kill_hub(self) -> None:
        self.hub.kill()
        self.outbox_at_kill = self.outboxes()

    def restart_hub(self) -> None:
        self.outbox_at_restart = self.outboxes()
        self.hub = self._start_hub()

    def outboxes(self) -> dict[int, tuple[int, dict[str, Any]]]:
        """Each running agent's outbox figures from its local API: {index: (pid, figures)}."""
        out = {}
        for i, port in enumerate(self.agent_ports):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/v1/telemetry")
                out[i] = (self.agents[i].proc.pid, json.loads(c.getresponse().read())["outbox"])
                c.close()
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                continue
        return out

    def hub_outage(self) -> dict[str, Any]:
        """What the agents sent again while the hub was down: resends per entry they owed
        when it came back (agents restarted meanwhile left out)."""
        a, b = getattr(self, "outbox_at_kill", {}), getattr(self, "outbox_at_restart", {})
        same = [i for i in b if i in a and a[i][0] == b[i][0]]
        resent = sum(b[i][1]["resent"] - a[i][1]["resent"] for i in same)
        owed = sum(b[i][1]["entries"] for i in same)
        return {"seconds": self.o.plan.hub_down_s, "agents": len(same), "resent": resent,
                "entries_owed": owed,
                "resends_per_entry": round(resent / owed, 2) if owed else None}

    def stop_broker(self) -> None:
        self.broker.process.kill()

    def start_broker(self) -> None:
        self.broker = start_broker(self.group, self.workdir, "mosquitto", port=self.broker.port)

def _schedule(plan: FaultPlan) -> list[tuple[float, str, Callable[[_Fleet], None]]]:
    """(time, description, action), in time order."""
    ev: list[tuple[float, str, Callable[[_Fleet], None]]] = []
    for n, at in enumerate(plan.agent_kills):
        i = n  # a different agent each time

        def kill(f: _Fleet, i: int = i) -> None:
            f.kill_agent(i % len(f.agents))

        def restart(f: _Fleet, i: int = i) -> None:
            f.restart_agent(i % len(f.agents))

        ev.append((at, f"kill -9 agent {i}", kill))
        ev.append((at + plan.restart_after_s, f"restart agent {i}", restart))
    ev.append((plan.broker_outage_at, "broker down (kill -9)", _Fleet.stop_broker))
    ev.append((plan.broker_outage_at + plan.broker_outage_s, "broker up", _Fleet.start_broker))
    ev.append((plan.hub_kill_at, "kill -9 hub", _Fleet.kill_hub))
    ev.append((plan.hub_kill_at + plan.hub_down_s, "restart hub", _Fleet.restart_hub))
    return sorted(ev, key=lambda e: e[0])


def run_scenario(o: ScenarioOptions, progress: Callable[[str], None] | None = None
                 ) -> dict[str, Any]:
    say = progress or (lambda _m: None)
    with np.load(STREAMS_FILE) as data:
        inputs = data["mixed_x"]
    plan = o.plan
    with work_folder(o.workdir, "ehi-faults-", o.keep) as workdir, ProcessGroup() as group:
        fleet = _Fleet(o, group, workdir)
        out_lo, out_hi = plan.broker_outage_at, plan.broker_outage_at + plan.broker_outage_s
        quota = [o.results // o.agents + (1 if i < o.results % o.agents else 0)
                 for i in range(o.agents)]
        drivers = [_Driver(i, fleet.agent_ports[i], quota[i], o.rate_hz,
                           inputs[i::o.agents], lambda t: out_lo <= t < out_hi)
                   for i in range(o.agents)]
        stop = threading.Event()
        t0 = time.monotonic()
        threads = [threading.Thread(target=d.run, args=(t0, stop), daemon=True)
                   for d in drivers]
        for t in threads:
            t.start()
        faults: list[dict[str, Any]] = []
        last_fault_end = 0.0
        monitor = _CatchUp(fleet.db, stop)
        monitor_thread = threading.Thread(target=monitor.run, daemon=True)
        monitor_thread.start()
        try:
            for at, what, action in _schedule(plan):
                delay = t0 + at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                at_s = time.monotonic() - t0
                action(fleet)
                fault: dict[str, Any] = {"at_s": round(at_s, 2), "fault": what}
                faults.append(fault)
                last_fault_end = time.monotonic()
                if what.startswith(("restart", "broker up")):
                    # From the recovery on: how long until the hub holds every result
                    # answered so far (the backlog of the fault drained)?
                    monitor.watch(fault, {rid for d in drivers for rid, _ in
                                          list(d.answered)}, last_fault_end)
                say(f"{at_s:7.1f} s  {what}  (answered so far: "
                    f"{sum(len(d.answered) for d in drivers)})")
            for th in threads:
                th.join()
        finally:
            stop.set()
        traffic_end = max(d.last_answer_at for d in drivers)
        produced = {rid for d in drivers for rid, _ in d.answered}
        degraded = {rid for d in drivers for rid, deg in d.answered if deg}
        say(f"traffic done: {len(produced)} answered; waiting for the hub to hold them all")
        drain_from = max(last_fault_end, traffic_end)
        deadline = time.monotonic() + o.drain_timeout_s
        drained_at = None
        while time.monotonic() < deadline:
            c = fleet.db.count(produced, degraded)
            if c["lost"] == 0 and c["late_answers_missing"] == 0:
                drained_at = time.monotonic()
                break
            time.sleep(POLL_S)
        time.sleep(SETTLE_S)
        counts = fleet.db.count(produced, degraded)
        fleet.db.close()
        report = {
            "results_produced": len(produced),
            "results_at_hub": counts["at_hub"],
            "lost": counts["lost"],
            "duplicates_in_db": counts["duplicates_in_db"],
            "duplicates_on_wire": counts["duplicates_on_wire"],
            "drain_seconds": (round(drained_at - drain_from, 2) if drained_at is not None
                              else None),
            "faults": faults,
            "unexpected_at_hub": counts["unexpected"],
            "degraded_answers": len(degraded),
            "hard_examples_at_hub": counts["hard_examples"],
            "late_answers_missing": counts["late_answers_missing"],
            "refused_while_agent_down": sum(d.refused for d in drivers),
            "error_answers": sum(len(d.errors) for d in drivers),
            "outage_submitted": sum(d.outage_submitted for d in drivers),
            "outage_answered": sum(d.outage_answered for d in drivers),
            "traffic_seconds": round(traffic_end - t0, 1),
            "hub_outage": fleet.hub_outage(),
            "resends_per_entry": fleet.hub_outage()["resends_per_entry"],
            "agents": o.agents, "rate_hz_per_agent": o.rate_hz,
            "workdir": str(workdir) if o.keep or o.workdir else None,
        }
        return report


class _CatchUp:
    """Measures, for each recovery, how long the hub took to hold every result answered before
    it: the time the fault's backlog took to drain while the traffic went on."""

    def __init__(self, db: _HubDb, stop: threading.Event) -> None:
        self.db = db
        self.stop = stop
        self._lock = threading.Lock()
        self._open: list[tuple[dict[str, Any], set[str], float]] = []

    def watch(self, fault: dict[str, Any], ids: set[str], since: float) -> None:
        with self._lock:
            self._open.append((fault, ids, since))

    def run(self) -> None:
        while not self.stop.wait(CATCH_UP_POLL_S) or self._open:
            with self._lock:
                pending = list(self._open)
            if not pending:
                continue
            at_hub = self.db.ids()
            now = time.monotonic()
            with self._lock:
                for item in pending:
                    fault, ids, since = item
                    if ids <= at_hub:
                        fault["caught_up_s"] = round(now - since, 2)
                        self._open.remove(item)
            if self.stop.is_set():
                return


class _HubDb:
    """Reads the hub's database directly (SQLite or PostgreSQL), not through its API."""

    def __init__(self, url: str) -> None:
        from cloud_hub.db import make_engine

        self.engine = make_engine(url)  # the hub's own URL handling

    def rows(self, sql: str) -> list[Any]:
        from sqlalchemy import text
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with self.engine.connect() as c:
                return list(c.execute(text(sql)))
        except SQLAlchemyError:  # the hub has not created its tables yet, or is restarting
            return []

    def ids(self) -> set[str]:
        return {r[0] for r in self.rows("SELECT id FROM results")}

    def count(self, produced: set[str], degraded: set[str]) -> dict[str, int]:
        ids = [r[0] for r in self.rows("SELECT id FROM results")]
        hard = {r[0] for r in self.rows("SELECT id FROM hard_examples")}
        dup = self.rows("SELECT COALESCE(SUM(duplicates), 0) FROM devices")
        at_hub = set(ids)
        return {"at_hub": len(ids), "lost": len(produced - at_hub),
                "duplicates_in_db": len(ids) - len(at_hub),
                "duplicates_on_wire": int(dup[0][0]) if dup else 0,
                "unexpected": len(at_hub - produced), "hard_examples": len(hard),
                "late_answers_missing": len(degraded - hard)}

    def close(self) -> None:
        self.engine.dispose()

