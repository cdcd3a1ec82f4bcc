"""`edge-agent`: the daemon on a device.

    edge-agent run [--config FILE] [--device-id ID] [--replay FILE --stream mixed ...]
    edge-agent check [--config FILE]    load the bundle on the backend and run one input
    edge-agent bench [BUNDLE] [--backend all] [--batch N] [--seconds S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from edge_agent.config import NO_BUNDLE
from edge_agent.errors import AgentError, ConfigError
from fleet.inference.errors import InferenceError
from fleet.transport.tuning import freeze_startup_heap, tune_gil_switch_interval

log = logging.getLogger("edge_agent")

# After the replay, how long to wait for the hub to acknowledge the last results.
DRAIN_TIMEOUT_S = 30.0
CONNECT_WAIT_S = 10.0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if args.device_id:
        o["device_id"] = args.device_id
    if args.backend:
        o["backend"] = args.backend
    if args.policy:
        o["policy"] = args.policy
    if args.threshold is not None:
        o["threshold"] = args.threshold
    return o


def cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent
    from edge_agent.config import load_settings
    from edge_agent.local_api import LocalApi
    from edge_agent.replay import load_stream, replay, shard_indices

    settings = load_settings(args.config, **_overrides(args))
    agent = Agent(settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The local API answers from the first moment, broker or not: a device whose network is
    # down still serves its application from the edge model.
    agent.start()
    freeze_startup_heap()
    api = None
    if settings.local_api.port >= 0:
        la = settings.local_api
        api = LocalApi(agent, la.host, la.port, la.max_body_bytes, la.max_connections,
                       la.idle_timeout_s)
        api.start()
    rp = settings.replay
    replayed = 0
    try:
        if rp.file is not None:
            # A replay is an experiment: give the broker a moment so that its first hard
            # inputs are offloaded rather than answered at the edge.
            if not agent.transport.wait_connected(CONNECT_WAIT_S):
                log.warning("no broker after %.0f s; replaying with edge answers only",
                            CONNECT_WAIT_S)
            x = load_stream(rp.file, rp.stream)
            idx = shard_indices(len(x), rp.shard_index, rp.shard_count, rp.limit)
            log.info("replaying %d inputs of %s:%s at %.0f/s", len(idx), rp.file, rp.stream,
                     rp.rate_hz)
            replayed = replay(lambda a, ref: agent.infer(a, input_ref=ref), x, idx, rp.stream,
                              rp.rate_hz, stop)
            agent.sender.flush()
            if rp.exit_when_done:
                if not agent.drain(DRAIN_TIMEOUT_S):
                    log.error("%d results still unacknowledged after %.0f s", len(agent.outbox),
                              DRAIN_TIMEOUT_S)
                stop.set()
        stop.wait()
    finally:
        if api:
            api.stop()
        agent.stop()
        if settings.summary_path:
            summary = {"device": agent.device, "replayed": replayed, **agent.telemetry()}
            settings.summary_path.write_text(json.dumps(summary, indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_agent.config import load_settings
    from fleet.inference.engine import Engine

    s = load_settings(args.config, **_overrides(args))
    if s.bundle is None:
        raise ConfigError(NO_BUNDLE)
    eng = Engine.open(s.bundle, s.backend, s.threads, s.policy, s.threshold,
                      options=s.backend_options(), fidelity=s.fidelity)
    spec = eng.manifest.raw_input
    r = eng.run(np.zeros(spec.shape, dtype=spec.dtype))
    print(json.dumps({"bundle": eng.manifest.ref, "backend": eng.backend.name,
                      "policy": eng.policy.name, "threshold": eng.policy.threshold,
                      "label": r.label, "edge_ms": round(r.edge_ms, 3),
                      "fidelity": eng.fidelity_summary()}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent.bench import dump, format_table, run_bench
    from fleet.contract.bundle import load_bundle
    from fleet.inference.backends import candidates

    try:
        manifest = load_bundle(args.bundle).manifest
    except Exception as exc:
        raise AgentError(str(exc)) from None
    names = candidates("auto" if args.backend == "all" else args.backend, manifest.runtimes)
    if args.backend == "auto":
        names = names[:1]
    rows = run_bench(args.bundle, names, batch=args.batch, seconds=args.seconds,
                     rounds=args.rounds, cold=not args.no_cold_start, threads=args.threads,
                     late_answers=args.late_answers)
    print(format_table(rows, manifest.ref))
    if args.json:
        dump(rows, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge-agent", description="Edge inference agent.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("run", "run the daemon"), ("check", "load the bundle, run one input")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--config", type=Path, help="TOML settings file ($EHI_AGENT_CONFIG)")
        sp.add_argument("--device-id")
        sp.add_argument("--backend", choices=["auto", "onnxruntime", "openvino"])
        sp.add_argument("--policy")
        sp.add_argument("--threshold", type=float)
    bp = sub.add_parser("bench", help="measure a bundle: bare runtime vs the agent, cold start, "
                                      "memory")
    bp.add_argument("bundle", type=Path,
                    help="bundle directory (this repository's: models/bundles/digits-edge)")
    bp.add_argument("--backend", default="all", choices=["all", "auto", "onnxruntime", "openvino"])
    bp.add_argument("--batch", type=int, default=1)
    bp.add_argument("--seconds", type=float, default=5.0,
                    help="measuring time per path and backend, split into rounds")
    bp.add_argument("--rounds", type=int, default=5)
    bp.add_argument("--threads", type=int, default=1)
    bp.add_argument("--no-cold-start", action="store_true", help="skip the cold-start runs")
    bp.add_argument("--late-answers", action="store_true",
                    help="keep hard inputs for a late cloud answer, as an offline agent does "
                         "(the bench's random inputs are mostly hard: the offline worst case)")
    bp.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    tune_gil_switch_interval()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"run": cmd_run, "check": cmd_check, "bench": cmd_bench}[args.cmd](args)
    except (AgentError, InferenceError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
