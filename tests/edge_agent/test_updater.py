"""The updater's state machine against the hub's real HTTP API: downloads, verification, health
check, the atomic switch, failures injected at each step, and crashes at each step."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import UpdateFailed
from edge_agent.slots import ModelSlots
from edge_agent.update_rules import DeviceProfile
from edge_agent.updater import Updater, UpdaterConfig, resolve_startup
from fleet.contract.assignment import Reported, UpdateState
from fleet.contract.bundle import MANIFEST_NAME, load_bundle
from fleet.inference.engine import Engine
from fleet.lab.bundle_copy import break_fidelity, break_golden, copy_bundle
from models import EDGE_BUNDLE, STREAMS_FILE
from tests.conftest import wait_until
from tests.fleet.inference.drift import Drift, swap_top2
from tests.updates import HubServer, UpdateKit, hub_settings

PROFILE = DeviceProfile("dev-1", ("x86_64",), ("onnxruntime",), 10 << 20)


class Crash(Exception):
    """Stands for kill -9 at a step: nothing after it runs."""


@pytest.fixture(scope="module")
def hub(kit: UpdateKit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    tmp = tmp_path_factory.mktemp("hub")
    with HubServer(hub_settings(tmp, kit)) as h:
        for v in (2, 3, 4):
            assert h.push(kit.version(v)).status_code == 201
        bad = copy_bundle(kit.version(5), tmp / "bad-golden", version=5, key=kit.key,
                          edit_files=break_golden)
        assert h.push(bad).status_code == 201
        yield h


class Device:
    """An updater with real slots and real engines, the way the agent wires it."""

    def __init__(self, kit: UpdateKit, hub: HubServer, root: Path,
                 crash_at: UpdateState | None = None, backend: str = "onnxruntime") -> None:
        self.kit = kit
        self.slots = ModelSlots(root)
        start = resolve_startup(self.slots, EDGE_BUNDLE, [kit.pub])
        self.startup = start
        assert start.bundle is not None
        self.engine = Engine.open(start.bundle, backend)
        self.reports: list[Reported] = []
        self.steps: list[UpdateState] = []

        def on_step(s: UpdateState) -> None:
            self.steps.append(s)
            if s is crash_at:
                raise Crash(s)

        cfg = UpdaterConfig(hub.url, [kit.pub], [kit.hub_key.public], PROFILE)
        self.updater = Updater(cfg, self.slots, open_engine=lambda p: Engine.open(p, backend),
                               swap=self._swap, running=lambda: self.engine,
                               report=self.reports.append, on_step=on_step)

    def _swap(self, e: Engine) -> None:
        self.engine = e

    def assign(self, v: int, seq: int, bundle: Path | None = None) -> None:
        self.updater.handle(self.kit.assignment("dev-1", bundle or self.kit.version(v), seq))

    @property
    def running(self) -> str:
        return self.engine.manifest.ref


def _on_disk(slots: ModelSlots) -> str:
    cur = slots.current()
    return load_bundle(cur).manifest.ref if cur else "factory"


def test_update_downloads_checks_and_switches(kit: UpdateKit, hub: HubServer,
                                              tmp_path: Path) -> None:
    d = Device(kit, hub, tmp_path / "m")
    d.assign(2, 1)
    assert d.running == "digits-edge@2"
    assert d.steps == [UpdateState.DOWNLOADING, UpdateState.VERIFYING, UpdateState.CHECKING,
                       UpdateState.ACTIVATING]
    assert d.reports[-1].state is UpdateState.IDLE and d.reports[-1].model == "digits-edge@2"
    assert d.slots.current() == d.slots.slot("a") and d.slots.previous() == EDGE_BUNDLE
    d.assign(3, 2)
    assert d.running == "digits-edge@3" and d.slots.current() == d.slots.slot("b")
    assert d.slots.previous() == d.slots.slot("a")
    # The same assignment again (retained, after a reconnect): nothing happens.
    n = len(d.steps)
    d.assign(3, 2)
    assert len(d.steps) == n and d.reports[-1].state is UpdateState.IDLE
    # A restart runs what `current` points to.
    again = resolve_startup(ModelSlots(tmp_path / "m"), EDGE_BUNDLE, [kit.pub])
    assert again.bundle is not None
    assert load_bundle(again.bundle).manifest.ref == "digits-edge@3"


def test_failed_health_check_keeps_the_old_model_and_reports_why(kit: UpdateKit,
                                                                 hub: HubServer,
                                                                 tmp_path: Path) -> None:
    d = Device(kit, hub, tmp_path / "m")
    d.assign(2, 1)
    bad = json.loads((hub.app.state.artifacts.root / "digits-edge" / "5" / MANIFEST_NAME)
                     .read_text())
    assert bad["version"] == 5
    d.updater.handle(d.kit.assignment("dev-1", hub.app.state.artifacts.root / "digits-edge" / "5",
                                      2))
    last = d.reports[-1]
    assert (last.state, last.code, last.model) == (UpdateState.FAILED, "health", "digits-edge@2")
    assert "golden output differs" in (last.error or "")
    assert d.running == "digits-edge@2" and _on_disk(d.slots) == "digits-edge@2"
    # The agent still answers with the old model.
    x = np.load(STREAMS_FILE)["clean_x"][:1]
    assert d.engine.predict_batch(x).shape == (1, 10)


def test_tampered_file_on_the_hub_fails_the_hash_check(kit: UpdateKit, hub: HubServer,
                                                       tmp_path: Path) -> None:
    d = Device(kit, hub, tmp_path / "m")
    stored = hub.app.state.artifacts.root / "digits-edge" / "4" / "model.onnx"
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        d.assign(4, 1)
        assert (d.reports[-1].state, d.reports[-1].code) == (UpdateState.FAILED, "hash")
        stored.write_bytes(original + b"\0" * 100)
        d.assign(4, 2)
        assert (d.reports[-1].state, d.reports[-1].code) == (UpdateState.FAILED, "size")
    finally:
        stored.write_bytes(original)
    assert d.running == "digits-edge@1" and d.slots.current() is None
    d.assign(4, 3)
    assert d.running == "digits-edge@4"


def test_refusals_are_reported_and_change_nothing(kit: UpdateKit, hub: HubServer,
                                                  tmp_path: Path) -> None:
    d = Device(kit, hub, tmp_path / "m")
    d.assign(3, 4)
    d.assign(2, 5)  # older
    assert (d.reports[-1].state, d.reports[-1].code) == (UpdateState.REFUSED, "version")
    d.assign(4, 3)  # a replayed (older) assignment, even for a newer version
    assert (d.reports[-1].state, d.reports[-1].code) == (UpdateState.REFUSED, "replay")
    assert d.running == "digits-edge@3" and _on_disk(d.slots) == "digits-edge@3"
    d.updater.handle(b"not a frame")
    assert d.reports[-1].code == "malformed" and d.running == "digits-edge@3"


@pytest.mark.parametrize("step", [UpdateState.DOWNLOADING, UpdateState.VERIFYING,
                                  UpdateState.CHECKING, UpdateState.ACTIVATING])
def test_a_crash_at_any_step_restarts_on_a_complete_model_and_resumes(
        kit: UpdateKit, hub: HubServer, tmp_path: Path, step: UpdateState) -> None:
    root = tmp_path / "m"
    d = Device(kit, hub, root)
    d.assign(2, 1)
    crashing = Device(kit, hub, root, crash_at=step)
    with pytest.raises(Crash):
        crashing.assign(3, 2)
    after = Device(kit, hub, root)  # the restart
    assert after.startup.bundle is not None
    assert load_bundle(after.startup.bundle).manifest.ref in ("digits-edge@2", "digits-edge@3")
    assert after.running == "digits-edge@2"  # the crash came before the switch
    after.assign(3, 2)  # the retained assignment arrives again
    assert after.running == "digits-edge@3" and _on_disk(after.slots) == "digits-edge@3"
    assert after.reports[-1].state is UpdateState.IDLE


def test_a_crash_between_switch_and_commit_comes_up_on_the_new_model(
        kit: UpdateKit, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "m"
    d = Device(kit, hub, root)

    def swap_then_die(e: Engine) -> None:
        raise Crash("after the pointer moved")

    d.updater._swap = swap_then_die
    with pytest.raises(Crash):
        d.assign(2, 1)
    after = Device(kit, hub, root)
    assert after.running == "digits-edge@2"
    assert after.slots.load_state().state == UpdateState.IDLE.value
    n = len(after.steps)
    after.assign(2, 1)
    assert len(after.steps) == n  # nothing left to do


def test_a_damaged_current_bundle_falls_back_to_the_previous(kit: UpdateKit, hub: HubServer,
                                                            tmp_path: Path) -> None:
    root = tmp_path / "m"
    d = Device(kit, hub, root)
    d.assign(2, 1)
    d.assign(3, 2)
    (d.slots.slot("b") / "model.onnx").write_bytes(b"rot")
    after = Device(kit, hub, root)
    assert after.running == "digits-edge@2" and after.startup.reverted_because
    assert after.slots.load_state().state == UpdateState.REVERTED.value
    (after.slots.slot("a") / "model.onnx").write_bytes(b"rot")
    last = Device(kit, hub, root)
    assert last.running == "digits-edge@1"  # the factory bundle


def test_download_resumes_where_it_stopped(kit: UpdateKit, hub: HubServer,
                                           tmp_path: Path) -> None:
    from edge_agent.download import fetch_file, file_url

    m = load_bundle(kit.version(2)).manifest
    entry = m.model_file()
    dest = tmp_path / "model.onnx"
    full = (kit.version(2) / "model.onnx").read_bytes()
    (tmp_path / "model.onnx.part").write_bytes(full[:5000])
    got = fetch_file(file_url(hub.url, "digits-edge", 2, "model.onnx"), dest, entry)
    assert got == len(full) - 5000 and dest.read_bytes() == full
    with pytest.raises(UpdateFailed) as ei:
        fetch_file(file_url(hub.url, "digits-edge", 99, "model.onnx"), tmp_path / "x", entry)
    assert ei.value.code == "download" and "404" in str(ei.value)


def test_requests_in_flight_finish_on_the_old_model(kit: UpdateKit, hub: HubServer,
                                                    tmp_path: Path) -> None:
    """Swapping while another thread runs inferences: every call answers, on one model."""
    d = Device(kit, hub, tmp_path / "m")
    x = np.load(STREAMS_FILE)["clean_x"][:1]
    stop = threading.Event()
    errors: list[BaseException] = []
    models: set[str] = set()

    def serve() -> None:
        while not stop.is_set():
            e = d.engine
            try:
                e.run(x[0])
                models.add(e.manifest.ref)
            except BaseException as exc:
                errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        d.assign(2, 1)
        d.assign(3, 2)
        # On a loaded machine the serving thread may not run between the swap and here: give
        # it the time to answer on the new model (it normally has, long before).
        wait_until(lambda: "digits-edge@3" in models, 30.0)
    finally:
        stop.set()
        t.join()
    assert errors == [] and {"digits-edge@1", "digits-edge@3"} <= models


def test_bundle_below_its_fidelity_floor_is_refused_and_the_old_model_serves(
        kit: UpdateKit, hub: HubServer, tmp_path: Path) -> None:
    unfaithful = copy_bundle(kit.version(6), tmp_path / "v6", version=6, key=kit.key,
                             edit_files=break_fidelity)
    assert hub.push(unfaithful).status_code == 201
    d = Device(kit, hub, tmp_path / "m")
    d.assign(6, 1, unfaithful)
    last = d.reports[-1]
    assert (last.state, last.code, last.model) == (UpdateState.FAILED, "fidelity",
                                                   "digits-edge@1")
    assert "agreement" in (last.error or "") and "below the bundle's floor" in (last.error or "")
    assert UpdateState.ACTIVATING not in d.steps
    assert d.running == "digits-edge@1" and d.slots.current() is None
    # The report carries the running model's own fidelity figures.
    assert last.fidelity is not None and last.fidelity["faithful"]


def test_bundle_faithful_on_one_backend_installs_and_serves_there(
        kit: UpdateKit, hub: HubServer, tmp_path: Path, drifting: Drift) -> None:
    drifting("onnxruntime", swap_top2(every=20))
    d = Device(kit, hub, tmp_path / "m", backend="auto")
    assert d.engine.backend.name == "openvino"
    d.assign(2, 1)
    assert d.running == "digits-edge@2" and d.engine.backend.name == "openvino"
    last = d.reports[-1]
    assert last.state is UpdateState.IDLE and last.fidelity is not None
    assert last.fidelity["backend"] == "openvino" and "onnxruntime" in last.fidelity["refused"]
    # Where the only runtime allowed drifts, the update fails on fidelity and nothing changes.
    only_ov = Device(kit, hub, tmp_path / "m2", backend="openvino")
    drifting("openvino", swap_top2(every=20))
    only_ov.assign(3, 1)
    assert (only_ov.reports[-1].state, only_ov.reports[-1].code) == (UpdateState.FAILED,
                                                                       "fidelity")
    assert only_ov.running == "digits-edge@1"


def test_a_failed_download_is_tried_again_while_its_assignment_stands(
        kit: UpdateKit, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundle is not on the hub yet: the download fails, the report says when the next
    try is, and once the bundle is there a later try installs it, with no new assignment."""
    import edge_agent.updater as updater_mod

    monkeypatch.setattr(updater_mod, "DOWNLOAD_ATTEMPTS", 1)
    monkeypatch.setattr(updater_mod, "RETRY_BASE_S", 0.3)
    monkeypatch.setattr(updater_mod, "RETRY_MAX_S", 0.6)
    d = Device(kit, hub, tmp_path / "m")
    later = kit.version(9)
    d.updater.start()
    try:
        d.updater.offer(kit.assignment("dev-1", later, 1))
        assert wait_until(lambda: any(r.state is UpdateState.FAILED and "next try in"
                                      in (r.error or "") for r in d.reports), 30)
        failed = next(r for r in d.reports if r.state is UpdateState.FAILED)
        assert failed.code == "download" and d.running == "digits-edge@1"
        assert hub.push(later).status_code == 201
        assert wait_until(lambda: d.running == "digits-edge@9", 60)
        assert d.reports[-1].state is UpdateState.IDLE
    finally:
        d.updater.stop()


def test_retry_delays_double_with_jitter_up_to_a_cap() -> None:
    from edge_agent.updater import RETRY_BASE_S, RETRY_JITTER, RETRY_MAX_S, retry_delay

    for n, base in ((1, RETRY_BASE_S), (2, 2 * RETRY_BASE_S), (3, 4 * RETRY_BASE_S),
                    (40, RETRY_MAX_S)):
        for _ in range(50):
            d = retry_delay(n)
            assert base * (1 - RETRY_JITTER) <= d <= base * (1 + RETRY_JITTER)
