"""The agent's model updater: from a signed assignment to a health-checked, atomic switch.

    idle ──assignment──► (rules) ──refused──► refused
                            │ accepted
                            ▼
                       downloading ──► verifying ──► checking ──► activating ──► idle
                                                  (loads on a backend
                                                   that passes the
                                                   fidelity check;
                                                   golden output,
                                                   latency)
                            │              │            │              │
                            └──────────────┴────────────┴──────────────┴──► failed
                                                      (old model kept; `reverted` if the
                                                       switch had begun)

Every transition is written to `state.json` (fsync, rename) before the work it names starts.
A crash anywhere leaves `current` on a complete bundle (see `slots.py`); on restart
`resolve_startup` loads it (or falls back to `previous`, then to the factory bundle), and the
retained assignment, delivered again on reconnect, resumes the update: a partial download
continues with an HTTP Range request, a finished step is checked again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.download import fetch_file, file_url
from edge_agent.errors import UpdateError, UpdateFailed, UpdateRefused
from edge_agent.slots import ModelSlots, UpdateRecord
from edge_agent.update_rules import DeviceProfile, TrustState, check_assignment
from fleet.contract.assignment import (
    Assignment,
    OffloadTarget,
    Reported,
    UpdateState,
    decode_desired,
)
from fleet.contract.bundle import MANIFEST_NAME, Bundle, Manifest, canonical_json, load_bundle
from fleet.contract.errors import BundleError, ProtocolError
from fleet.contract.signing import PublicKey, SignatureError, verify_bundle
from fleet.inference.engine import Engine
from fleet.inference.errors import FidelityError, HealthCheckFailed, InferenceError
from fleet.inference.health import check_health

log = logging.getLogger(__name__)

# A failed download (network, hub restart) is tried again this many times, waiting longer each
# time; then the update fails (`download`), and the whole update is tried again after a backoff
# (RETRY_BASE_S, doubling, +-25% jitter, at most RETRY_MAX_S) for as long as its assignment
# stands; the report's error says when the next try is. A partial download resumes.
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_RETRY_S = (1.0, 2.0, 4.0, 8.0)
RETRY_BASE_S = 30.0
RETRY_MAX_S = 900.0
RETRY_JITTER = 0.25


def retry_delay(failures: int) -> float:
    """Seconds before the next try of an update whose download failed `failures` times."""
    base = min(RETRY_MAX_S, RETRY_BASE_S * 2.0 ** min(max(failures - 1, 0), 32))
    return base * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
TRANSIENT = frozenset({UpdateState.DOWNLOADING.value, UpdateState.VERIFYING.value,
                       UpdateState.CHECKING.value, UpdateState.ACTIVATING.value})


@dataclass(frozen=True, slots=True)
class UpdaterConfig:
    hub_url: str
    trusted: list[PublicKey]     # fleet keys: bundles and rollback directives
    hub_keys: list[PublicKey]    # hub keys: assignments
    profile: DeviceProfile
    download_rate: float = 0.0   # bytes/s, 0: unlimited


def manifest_digest(manifest: dict[str, object]) -> str:
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


@dataclass(frozen=True, slots=True)
class Startup:
    """What the agent runs after a (re)start, and why."""

    bundle: Path | None  # None: no model installed and no factory bundle configured
    reverted_because: str | None = None


def resolve_startup(slots: ModelSlots, factory: Path | None, trusted: list[PublicKey]
                    ) -> Startup:
    """The bundle to run: `current` if it loads and verifies, else `previous` (the update is
    then reported as reverted), else the factory bundle. Finishes an activation that a crash
    interrupted after the switch."""
    record = slots.load_state()
    cur = slots.current()
    if cur is None:
        return Startup(factory)
    try:
        bundle = _load_trusted(cur, trusted)
    except (BundleError, OSError, ValueError) as exc:
        reason = f"bundle in {cur} does not verify: {exc}"
        log.error("%s; going back to the previous model", reason)
        prev = slots.revert()
        record.state, record.code, record.error = UpdateState.REVERTED.value, "load", reason
        slots.save_state(record)
        if prev is not None:
            try:
                _load_trusted(prev, trusted)
                return Startup(prev, reason)
            except (BundleError, OSError, ValueError) as exc2:
                log.error("previous bundle in %s does not verify either (%s); running the "
                          "factory bundle", prev, exc2)
                slots.revert()
        return Startup(factory, reason)
    if record.state in TRANSIENT and record.target_digest == manifest_digest(_raw_manifest(cur)):
        _committed(record, bundle.manifest)  # the switch happened; the crash came before commit
        slots.save_state(record)
    return Startup(cur)


def _raw_manifest(root: Path) -> dict[str, object]:
    d = json.loads((root / MANIFEST_NAME).read_text())
    return d if isinstance(d, dict) else {}


def _load_trusted(root: Path, trusted: list[PublicKey]) -> Bundle:
    if trusted:
        verify_bundle(root, trusted)
    return load_bundle(root)


def _committed(record: UpdateRecord, m: Manifest) -> None:
    record.state, record.error, record.code = UpdateState.IDLE.value, None, None
    record.highest[m.name] = max(record.highest.get(m.name, 0), m.version)


class Updater:
    """Runs assignments one at a time on its own thread; the newest assignment wins."""

    def __init__(self, config: UpdaterConfig, slots: ModelSlots, *,
                 open_engine: Callable[[Path], Engine], swap: Callable[[Engine], None],
                 running: Callable[[], Engine], report: Callable[[Reported], None],
                 on_step: Callable[[UpdateState], None] | None = None,
                 on_offload: Callable[[OffloadTarget | None], None] | None = None) -> None:
        self.config = config
        self.slots = slots
        self._open_engine = open_engine
        self._swap = swap
        self._running = running
        self._report = report
        self._on_step = on_step
        self._on_offload = on_offload
        self.record = slots.load_state()
        self._cond = threading.Condition()
        self._mailbox: bytes | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.last_report: Reported | None = None
        # The assignment whose download failed, and when it is tried again.
        self._retry: tuple[bytes, float] | None = None
        self._failures = 0

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="updater", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def offer(self, payload: bytes) -> None:
        """A desired-state message (from the network thread); replaces one not yet handled."""
        with self._cond:
            self._mailbox = payload
            self._cond.notify_all()

    def _newer_waiting(self) -> bool:
        with self._cond:
            return self._mailbox is not None or self._stop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._mailbox is None and not self._stop:
                    if self._retry is not None and time.monotonic() >= self._retry[1]:
                        break
                    self._cond.wait(None if self._retry is None
                                    else max(0.0, self._retry[1] - time.monotonic()))
                if self._stop:
                    return
                if self._mailbox is not None:
                    payload, self._mailbox = self._mailbox, None
                    if self._retry is None or payload != self._retry[0]:
                        self._failures = 0  # another assignment: its own backoff
                    self._retry = None
                else:
                    assert self._retry is not None
                    payload, self._retry = self._retry[0], None
                    log.info("trying the update again (download failed %d times)",
                             self._failures)
            try:
                self.handle(payload)
            except Exception:  # the updater must outlive any one bad assignment
                log.exception("update failed unexpectedly")
            self._schedule_retry(payload)

    def _schedule_retry(self, payload: bytes) -> None:
        """After a failed download, try the same assignment again later (a newer one that
        arrives meanwhile takes its place)."""
        rec = self.record
        if rec.state != UpdateState.FAILED.value or rec.code != "download":
            self._failures = 0
            return
        self._failures += 1
        delay = retry_delay(self._failures)
        with self._cond:
            if self._mailbox is None and not self._stop:
                self._retry = (payload, time.monotonic() + delay)
        at = datetime.fromtimestamp(time.time() + delay, UTC).strftime("%H:%M:%S UTC")
        rec.error = f"{rec.error}; next try in {delay:.0f} s (at {at})"
        log.warning("update to %s: download failed %d times; next try in %.0f s", rec.target,
                    self._failures, delay)
        self._save_and_report()

    # ------------------------------------------------------------------ one assignment

    def handle(self, payload: bytes) -> None:
        """Process one desired-state message to the end (refused, failed, or switched)."""
        try:
            a = decode_desired(payload, self.config.hub_keys)
        except SignatureError as exc:
            self._refuse(None, exc.code, str(exc))
            return
        except ProtocolError as exc:
            self._refuse(None, "malformed", f"desired state: {exc}")
            return
        rec = self.record
        if self._on_offload is not None and a.seq >= rec.max_seq:
            # The hub's offload setting for this device holds whatever becomes of the model.
            self._on_offload(a.offload)
        if (a.seq == rec.seq and manifest_digest(a.manifest) == rec.target_digest
                and rec.state not in TRANSIENT
                and not (rec.state == UpdateState.FAILED.value and rec.code == "download")):
            self.publish_report()  # delivered again (retained, on reconnect): already handled
            return
        running = self._running().manifest
        try:
            target = check_assignment(a, running=running, profile=self.config.profile,
                                      trusted=self.config.trusted,
                                      trust=TrustState(rec.max_seq, rec.highest))
        except UpdateRefused as exc:
            self._refuse(a, exc.code, str(exc))
            return
        if target is None:
            rec.seq, rec.max_seq = a.seq, max(rec.max_seq, a.seq)
            _committed(rec, running)
            rec.target, rec.target_digest = a.ref, manifest_digest(a.manifest)
            self._save_and_report()
            return
        self._install(a, target)

    def _install(self, a: Assignment, target: Manifest) -> None:
        rec = self.record
        digest = manifest_digest(a.manifest)
        keep = rec.target_digest == digest
        rec.target, rec.target_digest, rec.seq = target.ref, digest, a.seq
        rec.max_seq = max(rec.max_seq, a.seq)
        rec.error = rec.code = None
        engine: Engine | None = None
        switched = False
        try:
            self._step(UpdateState.DOWNLOADING)
            staging = self.slots.prepare_staging(keep)
            self._download(a, target, staging)
            if self._newer_waiting():
                return  # the next assignment supersedes this one (the slot is reused)
            self._step(UpdateState.VERIFYING)
            try:
                verify_bundle(staging, self.config.trusted)
            except BundleError as exc:
                raise UpdateFailed("verify", str(exc)) from None
            self._step(UpdateState.CHECKING)
            try:
                engine = self._open_engine(staging)
            except FidelityError as exc:
                raise UpdateFailed("fidelity", f"bundle {target.ref}: {exc}") from None
            except InferenceError as exc:
                raise UpdateFailed("health", f"bundle {target.ref} does not load: {exc}") from None
            try:
                report = check_health(engine)
            except HealthCheckFailed as exc:
                raise UpdateFailed("health", str(exc)) from None
            log.info("bundle %s healthy on %s: golden diff %.2g, median latency %.3f ms, "
                     "fidelity %s", target.ref, engine.backend.name, report.max_abs_diff,
                     report.latency_ms, engine.fidelity.agreement if engine.fidelity else "-")
            self._step(UpdateState.ACTIVATING)
            old = self._running()
            switched = True
            self.slots.activate(staging, old.bundle.root)
            self._swap(engine)
            engine = None
            _committed(rec, target)
            self._save_and_report()
            log.info("now running %s (was %s)", target.ref, old.manifest.ref)
        except UpdateError as exc:
            if engine is not None:
                engine.close()
            if switched:
                self.slots.revert()
            rec.state = (UpdateState.REVERTED if switched else UpdateState.FAILED).value
            rec.code, rec.error = exc.code, str(exc)
            log.warning("update to %s failed (%s): %s; staying on %s", target.ref, exc.code,
                        exc, self._running().manifest.ref)
            self._save_and_report()

    def _download(self, a: Assignment, target: Manifest, staging: Path) -> None:
        tmp = staging / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(a.manifest, indent=2, sort_keys=True) + "\n")
        tmp.replace(staging / MANIFEST_NAME)
        for entry in target.files:
            dest = staging / entry.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            url = file_url(self.config.hub_url, target.name, target.version, entry.path)
            for attempt in range(DOWNLOAD_ATTEMPTS):
                try:
                    fetch_file(url, dest, entry, rate_bps=self.config.download_rate)
                    break
                except UpdateFailed as exc:
                    if exc.code != "download" or attempt == DOWNLOAD_ATTEMPTS - 1:
                        raise
                    log.warning("download of %s failed (%s); retrying", entry.path, exc)
                    with self._cond:
                        if self._cond.wait_for(lambda: self._stop or self._mailbox is not None,
                                               DOWNLOAD_RETRY_S[attempt]):
                            raise UpdateFailed("download", "interrupted") from None

    # ------------------------------------------------------------------ state and reports

    def _step(self, state: UpdateState) -> None:
        self.record.state = state.value
        self._save_and_report()
        if self._on_step is not None:
            self._on_step(state)

    def _refuse(self, a: Assignment | None, code: str, error: str) -> None:
        log.warning("refused a model assignment (%s): %s", code, error)
        rec = self.record
        rec.state, rec.code, rec.error = UpdateState.REFUSED.value, code, error
        if a is not None:
            rec.target, rec.seq = a.ref, a.seq
            rec.target_digest = manifest_digest(a.manifest)
        self._save_and_report()

    def _save_and_report(self) -> None:
        self.slots.save_state(self.record)
        self.publish_report()

    def publish_report(self) -> None:
        rec = self.record
        running = self._running()
        r = Reported(self.config.profile.device, running.manifest.ref,
                     UpdateState(rec.state), rec.target, rec.error, rec.code, rec.seq,
                     fidelity=running.fidelity_summary())
        self.last_report = r
        self._report(r)
