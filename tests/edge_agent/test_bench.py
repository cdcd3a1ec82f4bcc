"""`edge-agent bench` with a tiny time budget: complete and sane, not fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import main
from fleet.contract.bundle import load_bundle
from fleet.inference.backends import BackendOptions, candidates, choose_fastest
from fleet.inference.engine import Engine
from fleet.inference.preprocess import Preprocessor
from models import EDGE_BUNDLE

KEYS = {"backend", "bare_ips", "agent_ips", "ratio", "added_us_p50", "api_ips",
        "api_added_us_p50", "cold_start_s", "rss_mb"}


@pytest.mark.slow
def test_bench_json_is_complete_and_sane(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", str(EDGE_BUNDLE), "--backend", "all", "--seconds", "0.3",
                 "--rounds", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["backend"] for r in rows] == ["onnxruntime", "openvino"]
    for r in rows:
        assert set(r) >= KEYS
        assert r["bare_ips"] > 0 and r["agent_ips"] > 0 and r["api_ips"] > 0
        assert 0 < r["ratio"] < 5
        assert r["agent_ips"] > r["api_ips"]  # HTTP costs something
        assert 0 < r["cold_start_s"] < 30
        assert 20 < r["rss_mb"] < 2000
    assert "bare/s" in capsys.readouterr().out


def test_bench_batch_mode(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", str(EDGE_BUNDLE), "--backend", "onnxruntime", "--batch", "8",
                 "--seconds", "0.2", "--rounds", "1", "--no-cold-start", "--json",
                 str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["batch"] == 8 and row["bare_ips"] > 0 and row["cold_start_s"] is None


def test_auto_measures_once_and_caches(tmp_path: Path) -> None:
    b = load_bundle(EDGE_BUNDLE)
    m = b.manifest
    names = candidates("auto", m.runtimes)
    assert names == ["onnxruntime", "openvino"]
    import numpy as np

    raw = np.zeros((1, 8, 8), np.float32)
    x = Preprocessor.for_manifest(m)(raw)
    opts = BackendOptions(cache_dir=tmp_path)
    be, timings, _ = choose_fastest(names, b.model_path, m.model_file().sha256, raw, x, opts)
    assert set(timings) == {"onnxruntime", "openvino"}
    assert be.name == min(timings, key=lambda k: timings[k])
    cached = json.loads((tmp_path / "backend-choice.json").read_text())
    assert list(cached.values()) == [timings]
    be2, timings2, _ = choose_fastest(names, b.model_path, m.model_file().sha256, raw, x, opts)
    assert be2.name == be.name and timings2 == timings  # read back, not measured again


def test_engine_auto_uses_the_cache(tmp_path: Path) -> None:
    eng = Engine.open(EDGE_BUNDLE, "auto", options=BackendOptions(cache_dir=tmp_path))
    assert eng.backend.name in ("onnxruntime", "openvino")
    assert (tmp_path / "backend-choice.json").is_file()


def _choose_probed(tmp_path: Path, opener: str) -> tuple[Any, dict[str, float],
                                                         dict[str, str], Any]:
    """`auto`'s choice between onnxruntime and OpenVINO on the digits edge bundle, each
    candidate probed with an opener of tests/fleet/inference/crashing_backend.py; and the
    preprocessed sample."""
    import numpy as np

    b = load_bundle(EDGE_BUNDLE)
    m = b.manifest
    raw = np.zeros((1, 8, 8), np.float32)
    x = Preprocessor.for_manifest(m)(raw)
    be, timings, refused = choose_fastest(
        ["onnxruntime", "openvino"], b.model_path, m.model_file().sha256, raw, x,
        BackendOptions(cache_dir=tmp_path),
        opener=f"tests.fleet.inference.crashing_backend:{opener}")
    return be, timings, refused, x


@pytest.mark.parametrize(("opener", "reason"), [("segfault_openvino", "crashed (SIGSEGV)"),
                                                 ("abort_openvino", "crashed (SIGABRT)")])
def test_a_backend_that_crashes_natively_is_refused_and_the_next_serves(
        tmp_path: Path, opener: str, reason: str) -> None:
    """`auto` loads each candidate in a probe process first: one whose load dies by a signal
    is refused as crashed, with the signal, and the agent's process goes on with the next."""
    be, timings, refused, x = _choose_probed(tmp_path, opener)
    assert be.name == "onnxruntime" and set(timings) == {"onnxruntime"}
    assert refused["openvino"].startswith(reason), refused
    assert be.run(x).shape[0] == 1  # and it serves


def test_a_backend_whose_probe_hangs_is_refused(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import fleet.inference.backends.probe as probe_mod

    monkeypatch.setattr(probe_mod, "PROBE_TIMEOUT_S", 5.0)
    be, _, refused, _ = _choose_probed(tmp_path, "hang_openvino")
    assert be.name == "onnxruntime"
    assert refused["openvino"].startswith("hung"), refused
