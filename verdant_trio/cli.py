"""Command line: `verdant-server` (the quickstart of the Verdant docs) and `verdant-trio`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial
from pathlib import Path

import trio

from .config import quickstart_settings
from .daemon import run_until_signalled

DEFAULT_SECRET = "notsecretnotsecretnotsecret"

QUICKSTART_BANNER = """\
🌿 Verdant (verdant-trio) development server listening on http://{host}:{port}

  Never use this server in production. It ignores authentication: anyone can get a token
  for any library from /auth/<libraryId>, and the admin API at {admin} is open.{secret_warning}

To connect your client, import `cliSync` and pass `cliSync('<library id>')` to `sync`, or supply
"http://{host}:{port}/auth/<libraryId>?userId=<userId>" to sync.authEndpoint.
<libraryId> and <userId> are up to you and your app. Clients on the same library ID will sync data.

Data: {data}/verdant-dbs (databases), {data}/verdant-files (files). Ctrl-C stops the server.
"""


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )


def quickstart_parser(prog: str = "verdant-server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a Verdant sync server for local development (no authentication).",
    )
    parser.add_argument("--port", "-p", type=int, default=int(os.environ.get("VERDANT_PORT", 3242)))
    parser.add_argument("--secret", default=os.environ.get("VERDANT_SECRET", DEFAULT_SECRET))
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--data-dir", type=Path, default=Path.cwd(), help="default: current directory")
    parser.add_argument("--sync-path", default="/verdant")
    parser.add_argument("--admin-path", default="/admin", help='"" mounts the admin API at /')
    parser.add_argument("--truancy-minutes", type=float, default=7 * 24 * 60)
    parser.add_argument("--log-level", default="INFO")
    return parser


def run_quickstart(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    settings = quickstart_settings(
        port=args.port,
        secret=args.secret,
        host=args.host,
        data_dir=args.data_dir.resolve(),
        sync_path=args.sync_path,
        admin_path=args.admin_path,
        truancy_minutes=args.truancy_minutes,
    )
    secret_warning = ""
    if args.secret == DEFAULT_SECRET:
        secret_warning = (
            "\n  The token secret is the public default: anyone can forge tokens. "
            "Pass --secret for anything shared."
        )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(run_until_signalled, settings))
            port = binds[0].rsplit(":", 1)[1] if binds else args.port
            print(
                QUICKSTART_BANNER.format(
                    host=args.host, port=port, admin=args.admin_path or "/",
                    secret_warning=secret_warning, data=args.data_dir.resolve(),
                ),
                flush=True,
            )

    trio.run(main)
    return 0


def quickstart_main(argv: list[str] | None = None) -> int:
    return run_quickstart(quickstart_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "quickstart":
        return run_quickstart(quickstart_parser("verdant-trio quickstart").parse_args(argv[1:]))
    print("usage: verdant-trio quickstart [options]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
