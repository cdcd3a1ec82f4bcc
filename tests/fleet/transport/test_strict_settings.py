"""Settings refuse typos at every depth, on agent and hub, naming the key's full path and the
closest valid key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloud_hub.core.config import load_hub_settings
from cloud_hub.errors import HubConfigError
from edge_agent.config import load_settings
from edge_agent.errors import ConfigError
from models import EDGE_BUNDLE


@pytest.mark.parametrize(("toml", "where", "hint"), [
    ("bundel = 'x'\n", "bundel", "bundle"),
    ("[update]\nenabeld = true\n", "update.enabeld", "update.enabled"),
    ("[offload]\ndeadine_ms = 50\n", "offload.deadine_ms", "offload.deadline_ms"),
    ("[results]\nresend_afer_s = 2\n", "results.resend_afer_s", "results.resend_after_s"),
    ("[local_api]\nprot = 9\n", "local_api.prot", "local_api.port"),
    ("[mqtt]\nhots = 'x'\n", "mqtt.hots", "mqtt.host"),
    ("[mqtt.tls]\nca_file = '/x'\ncert_fil = '/y'\n", "mqtt.tls.cert_fil", "mqtt.tls.cert_file"),
    ("[throughput]\nzzz = 1\n", "throughput.zzz", None),
])
def test_agent_settings_refuse_unknown_keys_at_every_depth(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, where: str,
        hint: str | None) -> None:
    for k in [k for k in os.environ if k.startswith("EHI_AGENT_")]:
        monkeypatch.delenv(k)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"bundle = '{EDGE_BUNDLE}'\n" * ("bundel" not in toml) + toml)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    text = str(err.value)
    assert f"{where}: unknown setting" in text, text
    if hint:
        assert f"did you mean {hint}?" in text, text


def test_agent_environment_typos_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("EHI_AGENT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("EHI_AGENT_BUNDLE", str(EDGE_BUNDLE))
    monkeypatch.setenv("EHI_AGENT_UPDATE__ENABELD", "true")
    with pytest.raises(ConfigError, match="EHI_AGENT_UPDATE__ENABELD: names no setting; did "
                                          "you mean EHI_AGENT_UPDATE__ENABLED"):
        load_settings()


@pytest.mark.parametrize(("name", "hint"), [
    ("EHI_HUB_DATABSE_URL", "EHI_HUB_DATABASE_URL"),
    ("EHI_HUB_AUTH__RATE_PR_S", "EHI_HUB_AUTH__RATE_PER_S"),
    ("EHI_HUB_MQTT__TLS__CA_FIL", "EHI_HUB_MQTT__TLS__CA_FILE"),
    ("EHI_HUB_DEVICE_QUOTA__OFFLOAD_PER_SEC", "EHI_HUB_DEVICE_QUOTA__OFFLOAD_PER_S"),
])
def test_hub_environment_typos_are_refused_at_every_depth(
        monkeypatch: pytest.MonkeyPatch, name: str, hint: str) -> None:
    for k in [k for k in os.environ if k.startswith("EHI_HUB_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv(name, "1")
    with pytest.raises(HubConfigError) as err:
        load_hub_settings()
    assert f"{name}: names no setting; did you mean {hint}?" in str(err.value)


def test_hub_nested_values_that_do_not_hold_name_their_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("EHI_HUB_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("EHI_HUB_AUTH__RATE_PER_S", "-1")
    with pytest.raises(HubConfigError, match=r"auth\.rate_per_s: "):
        load_hub_settings()
    monkeypatch.delenv("EHI_HUB_AUTH__RATE_PER_S")
    assert load_hub_settings().auth.rate_per_s == 50.0
