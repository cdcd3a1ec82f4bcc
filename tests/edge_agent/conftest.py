from tests.edge_agent.drift import drifting

__all__ = ["drifting"]
