from tests.fleet.inference.drift import drifting

__all__ = ["drifting"]
