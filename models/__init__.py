"""Bundled models: the reproducible pipeline that builds them, and the built bundles."""

from pathlib import Path

BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
DATA_DIR = Path(__file__).resolve().parent / "data"
EDGE_BUNDLE = BUNDLES_DIR / "digits-edge"
CLOUD_BUNDLE = BUNDLES_DIR / "digits-cloud"
STREAMS_FILE = DATA_DIR / "digits-streams.npz"
STREAMS = ("clean", "shifted", "mixed")
# The demo signing key of the bundled models. Its private half is public, in this repository:
# it proves nothing outside the demo. A fleet makes its own (`fleet keys generate`) and keeps
# the private key offline.
DEMO_KEY = Path(__file__).resolve().parent / "keys" / "demo-fleet.key"
DEMO_PUBLIC_KEY = DEMO_KEY.with_suffix(".pub")
