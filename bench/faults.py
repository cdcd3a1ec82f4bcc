"""Never lose a result, proven with the faults themselves.

    python bench/faults.py [--agents 4] [--results 10000] [--rate 25] [--hub-down 45]
                           [--json PATH] [--keep]

Starts its own Mosquitto on a free port (never the machine's shared one), a hub (SQLite, or
`--database-url`) and
the agents as real processes, and sends inputs at a fixed rate through each agent's local API
until the applications got `--results` answers. Meanwhile, by default: `kill -9` of agent 0 at
12 s and of agent 1 at 80 s (each restarted 1 s later), a 30 s broker outage from 25 s (the
broker killed, then started again on the same port), and `kill -9` of the hub at 65 s
(restarted `--hub-down` 45 s later). Then it waits for the backlog to drain and counts in the
hub's database:

- results_produced: answers the applications got (each a result record the agent owes the hub);
- results_at_hub, lost (produced but not in the database), duplicates_in_db;
- duplicates_on_wire: copies the hub received again and did not store (the devices' counters);
- drain_seconds: from the end of the last fault or of the traffic, whichever is later, until
  every produced result and every late-answered hard example is in the database;
- outage_answered / outage_submitted: inputs answered while the broker was down;
- faults: what was injected, and when; after each recovery, `caught_up_s`: how long until the
  hub held every result answered before it (the fault's backlog drained, traffic going on);
- hub_outage, resends_per_entry: what the agents sent again while the hub was down, per entry
  they owed when it came back (their outbox figures read from their local APIs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.lab.fault_injection import FaultPlan, ScenarioOptions, run_scenario


def table(r: dict) -> str:
    rows = [
        ("results produced (answers)", f"{r['results_produced']:,}"),
        ("results at the hub", f"{r['results_at_hub']:,}"),
        ("lost", f"{r['lost']}"),
        ("duplicates in the database", f"{r['duplicates_in_db']}"),
        ("duplicates on the wire", f"{r['duplicates_on_wire']:,}"),
        ("drain seconds", "timeout" if r["drain_seconds"] is None else f"{r['drain_seconds']}"),
        ("answered during broker outage", f"{r['outage_answered']:,} / "
                                          f"{r['outage_submitted']:,}"),
        ("degraded answers / hard examples at hub", f"{r['degraded_answers']:,} / "
                                                    f"{r['hard_examples_at_hub']:,}"),
        ("refused while an agent was down", f"{r['refused_while_agent_down']:,}"),
        ("answers other than 200", f"{r['error_answers']}"),
        ("at hub without an answer (agent killed)", f"{r['unexpected_at_hub']}"),
        ("traffic seconds", f"{r['traffic_seconds']}"),
        ("resends per entry while the hub was down", f"{r['resends_per_entry']} "
                                                     f"({r['hub_outage']['resent']:,} for "
                                                     f"{r['hub_outage']['entries_owed']:,} owed, "
                                                     f"{r['hub_outage']['seconds']:g} s)"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append("faults:")
    for f in r["faults"]:
        up = f" (every earlier result at the hub {f['caught_up_s']} s later)" \
            if "caught_up_s" in f else ""
        lines.append(f"  {f['at_s']:7.1f} s  {f['fault']}{up}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--results", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=25.0, help="inputs per second per agent")
    ap.add_argument("--outage", type=float, default=30.0, help="broker outage, seconds")
    ap.add_argument("--hub-down", type=float, default=45.0,
                    help="seconds the hub stays down after its kill -9")
    ap.add_argument("--database-url", help="the hub's database (default: SQLite in the workdir); "
                                           "e.g. postgresql://postgres@127.0.0.1/faults")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the logs and databases")
    args = ap.parse_args(argv)
    plan = FaultPlan(broker_outage_s=args.outage, hub_down_s=args.hub_down)
    o = ScenarioOptions(agents=args.agents, results=args.results, rate_hz=args.rate, plan=plan,
                        keep=args.keep, database_url=args.database_url)
    r = run_scenario(o, lambda m: print(m, flush=True))
    r["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    print(table(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    ok = (r["lost"] == 0 and r["duplicates_in_db"] == 0 and r["drain_seconds"] is not None
          and r["drain_seconds"] <= 60 and r["outage_answered"] == r["outage_submitted"]
          and r["resends_per_entry"] is not None and r["resends_per_entry"] <= 3)
    print("targets:", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
