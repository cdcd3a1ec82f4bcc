"""The agent's figures in Prometheus' text format, for `GET /metrics` on the local API.

Written by hand: a device needs no metrics library for a dozen numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_agent.agent import Agent

# Outbox figures that only grow (counters); the others are gauges.
_OUTBOX_COUNTERS = ("results_produced", "results_acked", "hard_produced", "hard_acked",
                    "rejected", "dropped_full", "dropped_expired", "resent")


def render(agent: Agent) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    ob = agent.outbox.stats().to_dict()
    metric("ehi_agent_outbox_entries", "gauge", "Entries waiting for the hub's acknowledgement",
           [('{kind="result"}', ob["results"]), ('{kind="hard"}', ob["hard_examples"])])
    metric("ehi_agent_outbox_bytes", "gauge", "Bytes waiting in the outbox", [("", ob["bytes"])])
    metric("ehi_agent_outbox_oldest_age_seconds", "gauge", "Age of the oldest waiting entry",
           [("", ob["oldest_age_s"])])
    for key in _OUTBOX_COUNTERS:
        metric(f"ehi_agent_outbox_{key}_total", "counter", f"Outbox entries {key}",
               [("", ob[key])])
    counters = agent.counters.snapshot()
    metric("ehi_agent_events_total", "counter", "Inputs, offloads, fallbacks and errors",
           [(f'{{event="{k}"}}', v) for k, v in sorted(counters.items())])
    metric("ehi_agent_offloads_pending", "gauge", "Offloads waiting for a cloud answer",
           [("", len(agent.pending))])
    metric("ehi_agent_connected", "gauge", "1 while connected to the broker",
           [("", 1.0 if agent.transport.connected else 0.0)])
    off = agent.offload_state()
    figures = [(f'{{figure="{k}"}}', float(off[k])) for k in
               ("target", "recent_rate", "threshold", "drift")
               if isinstance(off.get(k), int | float) and not isinstance(off.get(k), bool)]
    metric("ehi_agent_offload", "gauge", "Offloading: target share, share of the last 100 "
           "inputs, threshold, drift (log2 of target over the calibration share; |drift| >= 1 "
           "is drift)", figures)
    metric("ehi_agent_offload_drifting", "gauge", "1 while the offload controller reports drift",
           [("", 1.0 if off.get("drifting") is True else 0.0)])
    fid = agent.engine.fidelity
    if fid is not None:
        metric("ehi_agent_fidelity_agreement", "gauge", "Top-1 agreement with the bundle's "
               "reference on its fidelity set, on the serving backend",
               [(f'{{backend="{fid.backend}"}}', fid.agreement)])
    return "\n".join(lines) + "\n"
