"""Supervised workers: the hub's long-running loops (ingest, control, offloads, rollouts, broker
heartbeat) run here, so that no exception can end one and a hung one is seen.

A worker calls its `step` again and again. A step that raises is logged (with its traceback,
at most once per ERROR_LOG_EVERY_S per worker) and counted in
`ehi_hub_worker_errors_total{worker}`; what that step held is dropped and counted there (results
and hard examples are sent again by their devices, which have no ack for them), and the loop
goes on after ERROR_PAUSE_S. A step returns how long to pause before the next one (a tick) or
None; a step that could not do its work (the database does not answer, or is locked) raises
`Backoff`: the worker waits that long, and it does not count as progress.

`problem()` says what is wrong with a worker, for `/readyz` and `ehi_hub_worker_up{worker}`:
its thread has ended, one step has run longer than `stall_s` (a hang), or work has been
waiting for longer than `stall_s` without a step completing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cloud_hub.metrics import HubMetrics

log = logging.getLogger(__name__)

# After a step raised: long enough that a step failing at once cannot spin a core, short enough
# that the next message hardly waits.
ERROR_PAUSE_S = 0.05
# One traceback per worker this often; every failure is counted.
ERROR_LOG_EVERY_S = 30.0
# A worker whose step runs this long, or whose queue waits this long without a step completing,
# is stalled: /readyz turns 503. Far above any real step (a 256-message transaction takes tens of
# milliseconds; a cloud-model batch a few).
STALL_S = 30.0

Step = Callable[[], float | None]


class Backoff(Exception):
    """Raised by a step that could do nothing now (its database is down or locked): wait
    `seconds`, with no progress made."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"back off {seconds:.2f} s")
        self.seconds = seconds


class Worker:
    def __init__(self, name: str, step: Step, stop: threading.Event,
                 metrics: HubMetrics | None = None, *,
                 waiting: Callable[[], int] = lambda: 0, stall_s: float = STALL_S) -> None:
        self.name = name
        self.step = step
        self.waiting = waiting
        self.stall_s = stall_s
        self._stop = stop
        self._metrics = metrics
        self._thread: threading.Thread | None = None
        now = time.monotonic()
        self.step_started: float | None = None  # set while a step runs
        self.progress_at = now                   # the last step that completed
        self.errors = 0
        self._logged_at = -ERROR_LOG_EVERY_S

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step_started = time.monotonic()
            progress = True
            try:
                pause = self.step()
            except Backoff as b:
                pause, progress = b.seconds, False
            except BaseException as exc:  # the loop must outlive any step
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                pause = ERROR_PAUSE_S
                self._failed()
            finally:
                self.step_started = None
            if progress:
                self.progress_at = time.monotonic()
            if pause:
                self._stop.wait(pause)

    def _failed(self) -> None:
        self.errors += 1
        if self._metrics is not None:
            self._metrics.worker_errors.labels(self.name).inc()
        now = time.monotonic()
        if now - self._logged_at >= ERROR_LOG_EVERY_S:
            self._logged_at = now
            log.exception("worker %s: a step failed (%d so far); what it held is dropped and "
                          "the worker goes on", self.name, self.errors)

    def problem(self, now: float | None = None) -> str | None:
        """None if the worker is healthy, else why not (for /readyz)."""
        now = time.monotonic() if now is None else now
        if self._thread is None:
            return None  # not started (a process without this role)
        if not self.alive:
            return "its thread has ended" if not self._stop.is_set() else None
        started = self.step_started
        if started is not None and now - started > self.stall_s:
            return f"one step has run for {now - started:.0f} s"
        if self.waiting() > 0 and now - self.progress_at > self.stall_s:
            return f"{self.waiting()} messages wait and no step completed for " \
                   f"{now - self.progress_at:.0f} s"
        return None


def problems(workers: list[Worker], metrics: HubMetrics | None = None) -> dict[str, str]:
    """{worker: problem} of the workers that are not healthy; sets `ehi_hub_worker_up`."""
    now = time.monotonic()
    out: dict[str, str] = {}
    for w in workers:
        why = w.problem(now)
        if metrics is not None:
            metrics.worker_up.labels(w.name).set(0 if why else 1)
        if why:
            out[w.name] = why
    return out
