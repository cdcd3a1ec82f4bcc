"""`cloud-hub serve`: the hub's web API and MQTT bridge in one process; `cloud-hub migrate`;
`cloud-hub token`: an API token signed with the hub's secret (on the hub's host)."""

from __future__ import annotations

import argparse
import logging
import sys

from cloud_hub.errors import HubConfigError, HubError
from fleet.inference.errors import InferenceError
from fleet.transport.tuning import tune_gil_switch_interval


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cloud-hub", description="Cloud hub of the fleet.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve", help="serve the API and the MQTT bridge "
                                      "(settings from EHI_HUB_* variables)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8080)
    sp.add_argument("--database-url", help="overrides EHI_HUB_DATABASE_URL")
    sp.add_argument("--no-bridge", action="store_true", help="API only, no MQTT")
    mp = sub.add_parser("migrate", help="bring the database schema to the newest version "
                                        "(serve does this too at start)")
    mp.add_argument("--database-url", help="overrides EHI_HUB_DATABASE_URL")
    tp = sub.add_parser("token", help="issue an API token signed with this hub's secret "
                                      "(EHI_HUB_AUTH__MODE=jwt; EHI_HUB_AUTH__SECRET_FILE)")
    tp.add_argument("--subject", required=True, help="who the token is for")
    tp.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    tp.add_argument("--ttl-hours", type=float, default=8.0)
    args = ap.parse_args(argv)
    tune_gil_switch_interval()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from cloud_hub.core.config import load_hub_settings

    overrides = {"database_url": args.database_url} if args.database_url else {}
    if args.cmd == "token":
        from cloud_hub.auth import Authenticator

        try:
            settings = load_hub_settings(**overrides)
            print(Authenticator(settings.auth).issue(args.subject, args.role,
                                                     args.ttl_hours * 3600))
        except HubError as exc:
            print(f"cloud-hub: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "migrate":
        from cloud_hub.db import init_db, make_engine

        try:
            eng = make_engine(load_hub_settings(**overrides).database_url)
            init_db(eng)
            eng.dispose()
        except HubError as exc:
            print(f"cloud-hub: {exc}", file=sys.stderr)
            return 2
        print("database schema is up to date")
        return 0
    import uvicorn

    from cloud_hub.main import create_app

    try:
        settings = load_hub_settings(**overrides)
        if settings.cloud_bundle is None and not args.no_bridge:
            # Said before the server starts, not as a traceback from inside its start-up.
            raise HubConfigError("no cloud model: set EHI_HUB_CLOUD_BUNDLE to a bundle "
                                 "directory (this repository's: models/bundles/digits-cloud)")
        app = create_app(settings, with_bridge=not args.no_bridge)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except (HubError, InferenceError) as exc:
        print(f"cloud-hub: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
