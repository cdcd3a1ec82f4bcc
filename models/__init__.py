"""Bundled models: the reproducible pipeline that builds them, and the built bundles."""

from pathlib import Path

BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
DATA_DIR = Path(__file__).resolve().parent / "data"
EDGE_BUNDLE = BUNDLES_DIR / "digits-edge"
CLOUD_BUNDLE = BUNDLES_DIR / "digits-cloud"
STREAMS_FILE = DATA_DIR / "digits-streams.npz"
STREAMS = ("clean", "shifted", "mixed")
