"""Which broker the demo picks."""

from pathlib import Path

import pytest

from fleet.contract.errors import FleetError
from fleet.lab import brokers


def test_auto_falls_back_to_the_embedded_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(brokers.shutil, "which", lambda _name: None)
    monkeypatch.setattr(Path, "exists", lambda _self: False)
    assert brokers.resolve_kind("auto") == "embedded"
    with pytest.raises(FleetError, match="apt-get install mosquitto"):
        brokers.resolve_kind("mosquitto")


def test_auto_prefers_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(brokers.shutil, "which", lambda _name: "/usr/sbin/mosquitto")
    assert brokers.resolve_kind("auto") == "mosquitto"
    with pytest.raises(FleetError, match="unknown broker"):
        brokers.resolve_kind("rabbit")
