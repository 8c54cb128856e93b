"""Command line: `verdant-server` (the quickstart of the Verdant docs) and `verdant-trio`.

    verdant-trio serve --config verdant-trio.toml      the production daemon
    verdant-trio check-config verdant-trio.toml        validate without starting
    verdant-trio example-config                        the documented configuration
    verdant-trio token --library L --user U            mint a sync token (scripts, debugging)
    verdant-trio admin info|snapshot|evict|force-truant|evict-user ...   talk to a running daemon
    verdant-trio backup --out DIR                      consistent online copy of every shard
    verdant-trio quickstart [--port N]                 the development server (= verdant-server)

Exit status: 0 done, 1 failed, 2 bad usage, 78 bad configuration (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import trio

from ..sync.protocol import ReplicaType
from ..sync.tokens import TokenProvider, parse_duration_s
from . import logs
from .backup import ProgressBar, backup_all, list_shards
from .config import (
    EXIT_CONFIG,
    ConfigError,
    LoadedConfig,
    load_config,
    quickstart_settings,
    render_example,
)
from .version import package_version

log = logging.getLogger("verdant_trio.cli")

DEFAULT_SECRET = "notsecretnotsecretnotsecret"
ENV_CONFIG = "VERDANT_CONFIG"
SERVICE_CREDENTIALS = Path("/run/credentials/verdant-trio.service")
"""Where systemd keeps the unit's credentials while it runs; root's tools read them there."""

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


# -- quickstart (unchanged: the interop tests and the Verdant docs use it) ------------------


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

    from .daemon import (
        run_until_signalled,  # the server itself: only where it is served
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


# -- helpers ----------------------------------------------------------------------------------


class CommandError(Exception):
    """A failure to report as `error: ...` with exit status 1."""


def tool_environment(credentials_dir: Path | None) -> Mapping[str, str]:
    """The environment for loading the config outside the service.

    A config written for systemd names its secrets `${CREDENTIALS_DIRECTORY}/...`. Tools run by
    an operator find them where systemd keeps them while the service runs (readable by root).
    """
    environ = dict(os.environ)
    if credentials_dir is not None:
        environ["CREDENTIALS_DIRECTORY"] = str(credentials_dir)
    elif "CREDENTIALS_DIRECTORY" not in environ and SERVICE_CREDENTIALS.is_dir():
        environ["CREDENTIALS_DIRECTORY"] = str(SERVICE_CREDENTIALS)
    return environ


def load_for_tool(args: argparse.Namespace) -> LoadedConfig | None:
    path = args.config or os.environ.get(ENV_CONFIG)
    if not path:
        return None
    return load_config(
        path, environ=tool_environment(args.credentials_dir), require_secrets=False
    )


def add_config_option(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument(
        "--config", "-c", type=Path, required=required and not os.environ.get(ENV_CONFIG),
        default=os.environ.get(ENV_CONFIG),
        help=f"the daemon's TOML configuration (default: ${ENV_CONFIG})",
    )


def add_credentials_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--credentials-dir", type=Path, default=None,
        help="what ${CREDENTIALS_DIRECTORY} means in the config (default: "
        f"$CREDENTIALS_DIRECTORY, else {SERVICE_CREDENTIALS} if it exists)",
    )


def replica_type(value: str) -> ReplicaType:
    names = {t.name.lower().replace("_", "-"): t for t in ReplicaType}
    key = value.strip().lower().replace("_", "-")
    if key in names:
        return names[key]
    if key.isdigit() and int(key) in {int(t) for t in ReplicaType}:
        return ReplicaType(int(key))
    raise argparse.ArgumentTypeError(
        f"unknown replica type {value!r}; one of: {', '.join(names)} (or 0-5)"
    )


def duration(value: str) -> str:
    try:
        if parse_duration_s(value) <= 0:
            raise ValueError("must be positive")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


# -- serve / check-config ---------------------------------------------------------------------


def config_overrides(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    overrides: dict[tuple[str, str], Any] = {}
    for attribute, key in (
        ("host", ("server", "host")),
        ("port", ("server", "port")),
        ("log_level", ("logging", "level")),
        ("log_format", ("logging", "format")),
    ):
        value = getattr(args, attribute, None)
        if value is not None:
            overrides[key] = value
    return overrides


def run_serve(args: argparse.Namespace) -> int:
    overrides = config_overrides(args)
    reload = partial(load_config, args.config, overrides=overrides)
    try:
        loaded = reload()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print("verdant-trio: not starting: fix the configuration above", file=sys.stderr)
        return EXIT_CONFIG
    settings = loaded.settings
    logs.configure(settings.logging, secrets=settings.secrets)
    log.info(
        "starting version=%s config=%s databases=%s pid=%d",
        package_version(), settings.config_path, settings.core.libraries.databases_dir,
        os.getpid(),
    )
    from .daemon import (
        run_daemon,  # the server itself: `check-config` and the tools never load it
    )

    failed = False
    try:
        trio.run(partial(run_daemon, settings, reload=reload, loaded=loaded))
    except* OSError as group:  # cannot bind, storage directory not creatable, ...
        for error in group.exceptions:
            log.error("cannot serve error=%s", error)
        failed = True
    return 1 if failed else 0


def run_check_config(args: argparse.Namespace) -> int:
    try:
        loaded = load_config(args.path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    s = loaded.settings
    profiles = s.profile_settings
    lines = [
        f"{s.config_path}: ok",
        f"  listen      {s.host}:{s.port} (sync at {s.app.sync_path})",
        f"  databases   {s.core.libraries.databases_dir}",
        f"  files       {s.files_dir or 'disabled'}",
        f"  admin API   {s.app.admin_path if s.app.admin_token else 'disabled (no admin token)'}",
        f"  profiles    {profiles.url or profiles.callable or 'user id only'}",
        f"  metrics     {'/metrics' if s.metrics else 'disabled'}",
        f"  logging     {s.logging.level}, {s.logging.format}",
    ]
    if s.cluster is not None:
        c = s.cluster
        owned = len(c.placement.slots_of(c.node_id))
        lines.append(
            f"  cluster     node {c.node_id}: {owned} of {len(c.placement.owners)} slots "
            f"(table {c.placement_file}, version {c.placement.version})"
        )
    print("\n".join(lines))
    return 0


def run_example_config(args: argparse.Namespace) -> int:
    sys.stdout.write(render_example())
    return 0


# -- token --------------------------------------------------------------------------------------


def run_token(args: argparse.Namespace) -> int:
    loaded = load_for_tool(args)
    secret = os.environ.get("VERDANT_TOKEN_SECRET") or (
        loaded.settings.token_secret if loaded else ""
    )
    if not secret:
        raise CommandError(
            "no token secret: pass --config (with [auth] token_secret or token_secret_file) "
            "or set $VERDANT_TOKEN_SECRET"
        )
    sync_url = args.sync_url or (loaded.settings.sync_url if loaded else None)
    if not sync_url:
        raise CommandError("no sync endpoint: pass --sync-url or --config")
    token = TokenProvider(secret).get_token(
        args.library, args.user, sync_url,
        role=args.role, type=args.type, expires_in=args.expires_in,
    )
    print(token)
    return 0


# -- admin --------------------------------------------------------------------------------------


def admin_request(args: argparse.Namespace, method: str, path: str) -> Any:
    loaded = load_for_tool(args)
    token = os.environ.get("VERDANT_ADMIN_TOKEN") or (
        loaded.settings.app.admin_token if loaded else None
    )
    if not token:
        raise CommandError(
            "no admin token: pass --config (with [auth] admin_token or admin_token_file) "
            "or set $VERDANT_ADMIN_TOKEN"
        )
    if args.url:
        base = args.url.rstrip("/")
    elif loaded is not None:
        base = loaded.settings.local_url
    else:
        raise CommandError("no daemon address: pass --url or --config")
    admin_path = (loaded.settings.app.admin_path if loaded else args.admin_path) or ""
    url = base + admin_path.rstrip("/") + path
    try:
        with httpx.Client(timeout=args.timeout) as http:
            response = http.request(method, url, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach the daemon at {base}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = {"message": response.text[:200]}
    if response.status_code >= 400:
        message = body.get("message") if isinstance(body, dict) else None
        raise CommandError(f"HTTP {response.status_code}: {message or response.reason_phrase}")
    return body


def _lib(library: str) -> str:
    return quote(library, safe="")


def run_admin(args: argparse.Namespace) -> int:
    action = args.action
    library = _lib(args.library)
    if action == "info":
        print_json(admin_request(args, "GET", f"/libraries/{library}"))
    elif action == "snapshot":
        path = f"/libraries/{library}/documents/{_lib(args.collection)}/{_lib(args.document)}"
        print_json(admin_request(args, "GET", path))
    elif action == "evict":
        if not args.yes:
            if not sys.stdin.isatty():
                raise CommandError("evict deletes the library's server copy; pass --yes")
            answer = input(
                f"Evict library {args.library!r}? Connected clients reconnect and re-upload. [y/N] "
            )
            if answer.strip().lower() not in ("y", "yes"):
                print("not evicted", file=sys.stderr)
                return 1
        print_json(admin_request(args, "POST", f"/libraries/{library}/evict"))
    elif action == "force-truant":
        path = f"/libraries/{library}/replicas/{_lib(args.replica)}/force-truant"
        print_json(admin_request(args, "POST", path))
    elif action == "evict-user":
        path = f"/libraries/{library}/users/{_lib(args.user)}/evict"
        print_json(admin_request(args, "POST", path))
    return 0


# -- backup -------------------------------------------------------------------------------------


def run_backup(args: argparse.Namespace) -> int:
    if args.databases_dir is not None:
        databases_dir = args.databases_dir
    else:
        loaded = load_for_tool(args)
        if loaded is None:
            raise CommandError("pass --config (or --databases-dir)")
        databases_dir = loaded.settings.core.libraries.databases_dir
    if not databases_dir.is_dir():
        raise CommandError(f"no databases directory at {databases_dir}")
    if args.out.resolve() == databases_dir.resolve():
        raise CommandError("--out must not be the databases directory")
    shards = list_shards(databases_dir)
    bar = ProgressBar(len(shards), sys.stderr, enabled=args.progress)
    done, failed = backup_all(
        databases_dir, args.out, verify=args.verify, progress=bar.advance, shards=shards
    )
    bar.finish()
    for failure in failed:
        print(f"error: {failure.source.name}: {failure.error}", file=sys.stderr)
    size = sum(item.size_bytes for item in done)
    print(f"backed up {len(done)} of {len(shards)} libraries ({size} bytes) to {args.out}")
    return 1 if failed else 0


# -- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verdant-trio", description="Verdant sync server (Trio).",
        epilog="verdant-trio quickstart --help: the development server.",
    )
    parser.add_argument("--version", action="version", version=f"verdant-trio {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the production daemon")
    add_config_option(serve, required=True)
    serve.add_argument("--host", help="override [server] host")
    serve.add_argument("--port", type=int, help="override [server] port")
    serve.add_argument("--log-level", help="override [logging] level")
    serve.add_argument("--log-format", help="override [logging] format")
    serve.set_defaults(run=run_serve)

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("path", type=Path)
    check.set_defaults(run=run_check_config)

    example = commands.add_parser("example-config", help="print the documented configuration")
    example.set_defaults(run=run_example_config)

    token = commands.add_parser("token", help="mint a sync token")
    add_config_option(token)
    add_credentials_option(token)
    token.add_argument("--library", "-l", required=True)
    token.add_argument("--user", "-u", required=True)
    token.add_argument("--type", "-t", type=replica_type, default=ReplicaType.REALTIME,
                       help="realtime (default), push, passive-realtime, passive-push, "
                       "read-only-pull, read-only-realtime, or 0-5")
    token.add_argument("--expires-in", "-e", type=duration, default="1h",
                       help='seconds or e.g. "30m", "12h", "7d" (default 1h)')
    token.add_argument("--role")
    token.add_argument("--sync-url", help="the `url` claim (default: from the config)")
    token.set_defaults(run=run_token)

    admin = commands.add_parser("admin", help="administer a running daemon")
    add_config_option(admin)
    add_credentials_option(admin)
    admin.add_argument("--url", help="the daemon's base URL (default: host and port of the config)")
    admin.add_argument("--admin-path", default="/admin", help="without --config (default /admin)")
    admin.add_argument("--timeout", type=float, default=30.0)
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="replicas, server order and sizes of a library")
    info.add_argument("library")
    snapshot = actions.add_parser("snapshot", help="a document as the server sees it")
    snapshot.add_argument("library")
    snapshot.add_argument("collection")
    snapshot.add_argument("document")
    evict = actions.add_parser("evict", help="drop a library's data (clients re-upload)")
    evict.add_argument("library")
    evict.add_argument("--yes", "-y", action="store_true", help="do not ask")
    truant = actions.add_parser("force-truant", help="make a replica reset when it returns")
    truant.add_argument("library")
    truant.add_argument("replica")
    evict_user = actions.add_parser("evict-user", help="forget a user's replicas in a library")
    evict_user.add_argument("library")
    evict_user.add_argument("user")
    admin.set_defaults(run=run_admin)

    backup = commands.add_parser("backup", help="consistent online copy of every library")
    add_config_option(backup)
    add_credentials_option(backup)
    backup.add_argument("--out", "-o", type=Path, required=True, help="destination directory")
    backup.add_argument("--databases-dir", type=Path, help="instead of the config's")
    backup.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the quick_check of each copy")
    backup.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: when stderr is a terminal)")
    backup.set_defaults(run=run_backup)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "quickstart":
        return run_quickstart(quickstart_parser("verdant-trio quickstart").parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
