import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fleet.contract.bundle import Manifest, canonical_json, load_bundle
from fleet.contract.errors import BundleError, ProtocolError
from fleet.inference.preprocess import Preprocessor
from models import CLOUD_BUNDLE, EDGE_BUNDLE


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(EDGE_BUNDLE, dst)
    return dst


def _edit(root: Path, **changes: object) -> None:
    m = json.loads((root / "manifest.json").read_text())
    m.update(changes)
    (root / "manifest.json").write_text(json.dumps(m))


def test_bundled_models_load_and_verify() -> None:
    for root in (EDGE_BUNDLE, CLOUD_BUNDLE):
        b = load_bundle(root)
        assert b.manifest.version >= 1
        assert b.model_path.is_file()
    edge = load_bundle(EDGE_BUNDLE).manifest
    assert edge.hard_example is not None
    assert edge.hard_example.policy in edge.hard_example.thresholds
    # The brief's constraint: edge FLOPs at most a tenth of the cloud's.
    cloud = load_bundle(CLOUD_BUNDLE).manifest
    assert edge.metrics["flops"] * 10 <= cloud.metrics["flops"]


def test_manifest_roundtrip_is_canonical() -> None:
    m = load_bundle(EDGE_BUNDLE).manifest
    again = Manifest.from_dict(m.to_dict())
    assert canonical_json(again.to_dict()) == canonical_json(m.to_dict())


def test_altered_file_is_refused(bundle_copy: Path) -> None:
    f = bundle_copy / "model.onnx"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(bundle_copy)


def test_longer_file_is_refused(bundle_copy: Path) -> None:
    with (bundle_copy / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="bytes, manifest says"):
        load_bundle(bundle_copy)


def test_missing_file_and_manifest(bundle_copy: Path, tmp_path: Path) -> None:
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nothing")


def test_expired_bundle_is_refused(bundle_copy: Path) -> None:
    _edit(bundle_copy, expires=(datetime.now(UTC) - timedelta(days=1)).isoformat())
    with pytest.raises(BundleError, match="expired"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("change, message", [
    ({"schema": 99}, "schema"),
    ({"version": 0}, "version must be an integer in"),
    ({"version": 1 << 64}, "version must be an integer in"),
    ({"version": "2"}, "wrong type"),
    ({"files": [{"path": "../etc/passwd", "length": 1, "sha256": "0" * 64}]}, "plain relative"),
    ({"files": [{"path": "./model.onnx", "length": 1, "sha256": "0" * 64}]}, "plain relative"),
    ({"files": [{"path": "a//b", "length": 1, "sha256": "0" * 64}]}, "plain relative"),
    ({"files": [{"path": "/etc/passwd", "length": 1, "sha256": "0" * 64}]}, "plain relative"),
    ({"files": [{"path": ".hidden", "length": 1, "sha256": "0" * 64}]}, "plain relative"),
    ({"raw_input": {"dtype": "complex64", "shape": [8, 8]}}, "dtype"),
    # Names that a store or a path would resolve to another bundle's folder.
    ({"name": "./digits-edge"}, "not a plain name"),
    ({"name": "digits-edge/."}, "not a plain name"),
    ({"name": ".."}, "not a plain name"),
    ({"name": "a/b"}, "not a plain name"),
    ({"name": ""}, "not a plain name"),
    ({"name": "x" * 65}, "not a plain name"),
])
def test_malformed_manifests(bundle_copy: Path, change: dict, message: str) -> None:
    _edit(bundle_copy, **change)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_not_json(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{nope")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


def test_preprocessing_minmax_and_shape() -> None:
    pre = Preprocessor.for_manifest(load_bundle(EDGE_BUNDLE).manifest)
    x = np.full((8, 8), 8.0, dtype=np.float32)
    out = pre(x)
    assert out.shape == (1, 1, 8, 8) and out.dtype == np.float32
    assert np.allclose(out, 0.5)
    assert pre(np.full((8, 8), 99.0)).max() == 1.0  # clipped
    assert pre(np.zeros((5, 8, 8))).shape == (5, 1, 8, 8)
    assert pre(np.zeros((8, 8), dtype=np.uint8)).dtype == np.float32


@pytest.mark.parametrize("bad, message", [
    (np.zeros((64,)), "does not match"),
    (np.zeros((8, 9)), "does not match"),
    (np.array([["a"] * 8] * 8), "not numeric"),
    (np.full((8, 8), np.nan), "NaN"),
])
def test_preprocessing_refuses_bad_inputs(bad: np.ndarray, message: str) -> None:
    pre = Preprocessor.for_manifest(load_bundle(EDGE_BUNDLE).manifest)
    with pytest.raises(ProtocolError, match=message):
        pre(bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_preprocessing_finiteness_check_is_exact(dtype: type) -> None:
    """The finiteness test is a dot product with zeros: one NaN or infinity anywhere is
    caught, and huge finite numbers (whose sum would overflow) are not refused."""
    pre = Preprocessor.for_manifest(load_bundle(EDGE_BUNDLE).manifest)
    big: np.ndarray = np.full((3, 8, 8), np.finfo(dtype).max, dtype=dtype)
    assert pre(big).max() == 1.0
    for bad in (np.nan, np.inf, -np.inf):
        for at in ((0, 0, 0), (2, 7, 7), (1, 3, 4)):
            x = big.copy()
            x[at] = bad
            with pytest.raises(ProtocolError, match="NaN"):
                pre(x)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64, np.float16,
                                   np.float32, np.float64])
def test_preprocessing_gives_the_same_numbers_for_every_input_dtype(dtype: type) -> None:
    """The first step reads a raw dtype float32 holds exactly straight from the input; the
    others are copied first. Either way: the numbers of casting to float32 and then applying
    the steps, in both the fresh and the reused-buffer paths."""
    pre = Preprocessor.for_manifest(load_bundle(EDGE_BUNDLE).manifest)
    rng = np.random.default_rng(5)
    x: np.ndarray = rng.uniform(-3, 20, size=(4, 8, 8)).astype(dtype)
    want = np.clip(x.astype(np.float32) * np.float32(1 / 16), 0, 1).reshape(4, 1, 8, 8)
    assert np.array_equal(pre(x), want)
    assert np.array_equal(pre(x, reuse=True), want)
    assert np.array_equal(pre(x[0], reuse=True), want[:1])


def test_unknown_preprocessing_step() -> None:
    m = load_bundle(EDGE_BUNDLE).manifest
    with pytest.raises(BundleError, match="unknown preprocessing step"):
        Preprocessor(m.raw_input, [{"type": "fft"}])


def test_fidelity_spec_round_trips_and_bad_ones_are_refused(bundle_copy: Path) -> None:
    m = load_bundle(bundle_copy).manifest
    assert m.fidelity is not None and m.fidelity.file == "fidelity.npz"
    assert 0.99 <= m.fidelity.min_agreement <= 1 and m.fidelity.offload_budget == 0.22
    assert Manifest.from_dict(m.to_dict()).fidelity == m.fidelity
    fid = m.fidelity.to_dict()
    for bad, msg in (({**fid, "file": "missing.npz"}, "not among the bundle's files"),
                     ({**fid, "min_agreement": 1.5}, "min_agreement"),
                     ({**fid, "offload_budget": 0}, "offload_budget"),
                     ({**fid, "min_agreement": "high"}, "wrong type"),
                     ("all of it", "must be an object")):
        _edit(bundle_copy, fidelity=bad)
        with pytest.raises(BundleError, match=msg):
            load_bundle(bundle_copy)


def test_offload_target_validation() -> None:
    from fleet.contract.assignment import OffloadTarget

    ok = OffloadTarget.from_dict({"mode": "budget", "target": 0.2, "max_bytes_per_s": 5000})
    assert ok == OffloadTarget("budget", 0.2, 5000.0)
    assert OffloadTarget.from_dict(ok.to_dict()) == ok
    assert OffloadTarget.from_dict({"mode": "threshold"}) == OffloadTarget("threshold")
    for bad in ({"mode": "always"}, {"mode": "budget", "target": 1.0},
                {"mode": "budget", "target": -0.1}, {"mode": "budget", "target": True},
                {"mode": "budget", "max_bytes_per_s": float("nan")}, [1]):
        with pytest.raises(ProtocolError):
            OffloadTarget.from_dict(bad)
