"""The update-safety scenario of bench/update_safety.py, smaller: every attack, a few crashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.lab.brokers import mosquitto_path
from fleet.lab.update_safety import SafetyOptions, run_safety
from tests.conftest import need


@pytest.mark.slow
@pytest.mark.mosquitto
def test_attacks_crashes_revert_and_hot_swap(tmp_path: Path) -> None:
    need(mosquitto_path() is not None, "mosquitto is not installed")
    r = run_safety(SafetyOptions(crash_trials=4, swap_rate_hz=100.0, swap_seconds=2.0,
                                 workdir=tmp_path)).figures()
    assert r["attacks_total"] == 10
    failed = [a for a in r["attacks"] if not a["rejected"]]
    assert failed == []
    assert {a["code"] for a in r["attacks"]} == {a["expected"] for a in r["attacks"]}
    assert r["crash_safe"] == r["crash_trials"] == 4, r["crashes"]
    assert r["revert_seconds"] is not None and r["revert_seconds"] <= 60
    assert "health" in (r["revert_reported"] or "")
    assert r["swap_failed_requests"] == 0 and len(r["swap"]["models"]) == 2, r["swap"]
