"""Command line: `verdant-server` (the quickstart of the Verdant docs) and `verdant-trio`.

    verdant-trio serve --config verdant-trio.toml      the production daemon
    verdant-trio check-config verdant-trio.toml        validate without starting
    verdant-trio example-config                        the documented configuration
    verdant-trio token --library L --user U            mint a sync token (scripts, debugging)
    verdant-trio admin info|snapshot|evict|force-truant|evict-user ...   talk to a running daemon
    verdant-trio backup --out DIR                      consistent online copy of every shard
    verdant-trio litestream-config --replica URL       Litestream configuration for the shards
    verdant-trio restore --from URL [--library ID]     libraries back from a Litestream replica
    verdant-trio quickstart [--port N]                 the development server (= verdant-server)
    verdant-trio cluster placement|haproxy-config|locate ...   a cluster's table and front
    verdant-trio cluster move|rebalance|status ...     move slots between running nodes
    verdant-trio cluster-dev --nodes N [--port N]      a development cluster behind HAProxy

Exit status: 0 done, 1 failed, 2 bad usage, 78 bad configuration (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
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
from .cluster import placement as tables
from .cluster.haproxy import HaproxySettings, parse_node
from .cluster.haproxy import render_config as render_haproxy_config
from .cluster.tablefile import read_placement, write_placement
from .config import (
    EXIT_CONFIG,
    ConfigError,
    LoadedConfig,
    ServerSettings,
    load_config,
    quickstart_settings,
    render_example,
)
from .replication.litestream import Replica, ReplicaError, find_binary
from .replication.litestream import render_config as render_litestream_config
from .replication.lock import DirectoryBusy
from .replication.restore import RestoreRefused, restore_all
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
    if args.quickstart:
        settings = quickstart_extras(settings)
        reload = partial(_with_quickstart_extras, reload)
        log.warning(
            "quickstart extras on: anyone gets a token for any library from /auth/<libraryId> "
            "and the admin API is open; never in production"
        )
    from .daemon import (
        run_daemon,  # the server itself: `check-config` and the tools never load it
    )

    failed = False
    if args.quickstart:
        loaded = dataclasses.replace(loaded, settings=settings)
    try:
        trio.run(partial(run_daemon, settings, reload=reload, loaded=loaded))
    except* OSError as group:  # cannot bind, storage directory not creatable, ...
        for error in group.exceptions:
            log.error("cannot serve error=%s", error)
        failed = True
    return 1 if failed else 0


def quickstart_extras(settings: ServerSettings) -> ServerSettings:
    """`serve --quickstart`: the development server's open admin API and dev token route."""
    app = dataclasses.replace(
        settings.app, admin_open=True, dev_token_secret=settings.token_secret
    )
    return dataclasses.replace(settings, app=app)


def _with_quickstart_extras(reload: Callable[[], LoadedConfig]) -> LoadedConfig:
    loaded = reload()
    return dataclasses.replace(loaded, settings=quickstart_extras(loaded.settings))


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


# -- replication (Litestream) -------------------------------------------------------------------


def databases_dir_of(args: argparse.Namespace) -> Path:
    if args.databases_dir is not None:
        return Path(args.databases_dir)
    loaded = load_for_tool(args)
    if loaded is None:
        raise CommandError("pass --config (or --databases-dir)")
    return loaded.settings.core.libraries.databases_dir


def run_litestream_config(args: argparse.Namespace) -> int:
    try:
        replica = Replica.parse(args.replica)
        text = render_litestream_config(
            databases_dir_of(args).absolute(), replica,
            sync_interval=args.sync_interval,
            meta_dir=args.meta_dir.absolute() if args.meta_dir else None,
        )
    except (ReplicaError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}: run `litestream replicate -config {args.out}`", file=sys.stderr)
    return 0


def run_restore(args: argparse.Namespace) -> int:
    try:
        replica = Replica.parse(args.source)
        binary = find_binary(args.litestream)
    except (ReplicaError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    databases_dir = databases_dir_of(args)
    tool = f"verdant-trio {package_version()}, {litestream_version(binary)}"
    try:
        done, failed = restore_all(
            binary, replica, databases_dir, args.library or None,
            force=args.force, timestamp=args.timestamp,
            meta_dir=args.meta_dir, tool=tool,
        )
    except (RestoreRefused, DirectoryBusy) as exc:
        raise CommandError(f"nothing restored: {exc}") from None
    for shard in done:
        aside = f"; replaced shard kept as {shard.replaced.name}" if shard.replaced else ""
        print(
            f"restored {shard.library_id}: {shard.operations} operations, {shard.baselines} "
            f"baselines, {shard.replicas} replicas; integrity ok; marked restored{aside}"
        )
    for failure in failed:
        print(f"error: {failure.library_id}: {failure.error}", file=sys.stderr)
    print(f"restored {len(done)} of {len(done) + len(failed)} libraries into {databases_dir}")
    return 1 if failed else 0


def litestream_version(binary: Path) -> str:
    try:
        result = subprocess.run(
            [str(binary), "version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandError(f"cannot run {binary}: {exc}") from None
    return f"litestream {result.stdout.strip() or 'unknown'}"


# -- cluster ------------------------------------------------------------------------------------


def node_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    try:
        for name in names:
            tables.check_node_name(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def node_name(value: str) -> str:
    try:
        return tables.check_node_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_cluster_placement(args: argparse.Namespace) -> int:
    """The first table for a node list, or (--from) a new version of a table for a new list."""
    try:
        if args.source is None:
            if args.out.exists():
                raise CommandError(
                    f"{args.out} exists: a table in use changes by a new version (--from it), "
                    "so every node can tell the newer one"
                )
            table = tables.generate(args.nodes)
            moves: list[tables.SlotMove] = []
        else:
            current = read_placement(args.source)
            table = tables.rebalance(current, args.nodes)
            moves = tables.moves_between(current, table)
        write_placement(args.out, table)
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None
    counts = ", ".join(f"{node} {count}" for node, count in table.counts().items())
    print(f"wrote {args.out}: version {table.version}, {counts} slots")
    for move in moves:
        print(f"  move {move}")
    if moves:
        moved = sum(move.count for move in moves)
        print(
            f"{moved} slots change node. Their shards and files must be on their new node "
            "before it reads this table (see `verdant-trio cluster locate`)."
        )
    return 0


def run_cluster_haproxy_config(args: argparse.Namespace) -> int:
    try:
        table = read_placement(args.placement)
        nodes = [parse_node(spec) for spec in args.nodes.split(",") if spec.strip()]
        host, _, port = args.bind.rpartition(":")
        settings = HaproxySettings(
            placement_path=args.placement.absolute(),
            bind_host=host.strip("[]") if host else "127.0.0.1",
            bind_port=int(port),
            sync_path=args.sync_path,
            admin_path=args.admin_path,
            stats_port=args.stats_port or None,
            runtime_socket=args.socket,
            refusal_delay_s=args.refusal_delay_s,
        )
        config = render_haproxy_config(table, nodes, settings)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.out is None:
        sys.stdout.write(config)
    else:
        args.out.write_text(config)
        print(f"wrote {args.out}: check it with `haproxy -c -f {args.out}`")
    return 0


SHARD_SUFFIXES = (".sqlite-wal", ".sqlite-shm", ".sqlite")


def run_cluster_locate(args: argparse.Namespace) -> int:
    """Which node owns each shard (or files directory) under the given paths."""
    from ..storage.names import decode_name

    try:
        table = read_placement(args.placement)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    entries: list[Path] = []
    for path in args.paths:
        if path.is_dir() and not args.entries_only:
            entries.extend(sorted(path.iterdir()))
        elif path.exists():
            entries.append(path)
        else:
            raise CommandError(f"{path}: no such file or directory")
    for entry in entries:
        name = entry.name
        for suffix in SHARD_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        try:
            library = decode_name(name)
        except ValueError:
            print(f"{entry}: not a library's shard or files directory; skipped", file=sys.stderr)
            continue
        if name.startswith(".") or not library:
            continue
        slot = tables.slot_of(library)
        owner = table.owner(slot)
        if args.node is None:
            print(f"{entry}\t{slot}\t{owner}")
        elif owner == args.node:
            print(entry)
    return 0


@dataclasses.dataclass(frozen=True)
class ClusterAccess:
    """How a tool reaches every node's internal listener, from one node's configuration."""

    urls: dict[str, str]
    secret: str


def cluster_access(args: argparse.Namespace) -> ClusterAccess:
    loaded = load_for_tool(args)
    if loaded is None:
        raise CommandError("--config: a node's configuration ([cluster] names every node)")
    cluster = loaded.settings.cluster
    if cluster is None:
        raise CommandError(f"{loaded.settings.config_path}: no [cluster] section")
    if cluster.internal_port is None:
        raise CommandError(f"{loaded.settings.config_path}: [cluster] internal_port is not set")
    if not cluster.secret:
        raise CommandError(
            f"{loaded.settings.config_path}: no cluster secret ([cluster] secret or secret_file; "
            "--credentials-dir for a file under ${CREDENTIALS_DIRECTORY})"
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        cluster.internal_host, cluster.internal_host
    )
    host = f"[{host}]" if ":" in host else host
    urls = {cluster.node_id: f"http://{host}:{cluster.internal_port}", **cluster.peers}
    return ClusterAccess(urls, cluster.secret)


def _front(args: argparse.Namespace) -> Any:
    from .cluster.runtime import HaproxyFront

    if args.no_haproxy:
        print("warning: --no-haproxy: HAProxy's map is not changed; it routes by the old table "
              "until you change it", file=sys.stderr)
        return None
    return HaproxyFront(args.haproxy_socket, args.haproxy_map)


def _say(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def _run_moves(args: argparse.Namespace, work: Callable[..., Any]) -> int:
    """Run `work(nodes, front)` (a list of move reports); print them; 0 if every move worked."""
    from .cluster.move import MoveRefused
    from .cluster.peer import open_peers

    access = cluster_access(args)
    front = _front(args)

    async def main() -> list[Any]:
        async with open_peers(access.urls, access.secret) as nodes:
            reports: list[Any] = await work(nodes, front)
            return reports

    try:
        reports = trio.run(main)
    except MoveRefused as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print_json([report.to_json() for report in reports])
    else:
        for report in reports:
            print(report.summary())
        if not reports:
            print("nothing to move")
    return 0 if all(report.ok for report in reports) else 1


def slot_selection(args: argparse.Namespace) -> frozenset[int]:
    slots: set[int] = set()
    if args.slots:
        try:
            slots |= tables.parse_slots(args.slots)
        except ValueError as exc:
            raise CommandError(f"SLOTS: {exc}") from None
    for library in args.library or ():
        slots.add(tables.slot_of(library))
    if not slots:
        raise CommandError("name the slots to move (e.g. 0:99,512) or --library ID")
    return frozenset(slots)


def run_cluster_move(args: argparse.Namespace) -> int:
    from .cluster.move import move_slots

    slots = slot_selection(args)

    async def work(nodes: Any, front: Any) -> Any:
        print(f"moving slots {tables.format_slots(slots)} to {args.to}", file=sys.stderr)
        return await move_slots(nodes, front, slots, args.to,
                                post_commit_timeout_s=args.timeout, on_step=_say)

    return _run_moves(args, work)


def run_cluster_rebalance(args: argparse.Namespace) -> int:
    from .cluster.move import MoveReport, rebalance_slots

    if args.slots_per_move < 1:
        raise CommandError("--slots-per-move must be at least 1")

    def progress(report: MoveReport) -> None:
        print(report.summary(), file=sys.stderr, flush=True)

    async def work(nodes: Any, front: Any) -> list[MoveReport]:
        print(f"rebalancing to {', '.join(args.nodes)}", file=sys.stderr)
        return await rebalance_slots(
            nodes, front, args.nodes, max_slots=args.slots_per_move,
            post_commit_timeout_s=args.timeout, on_step=_say, on_report=progress,
        )

    return _run_moves(args, work)


def run_cluster_status(args: argparse.Namespace) -> int:
    from .cluster.peer import PeerError, open_peers
    from .cluster.runtime import HaproxyFront, RuntimeApiError, server_states

    access = cluster_access(args)

    async def main() -> dict[str, Any]:
        nodes_found: dict[str, Any] = {}
        table = None
        async with open_peers(access.urls, access.secret) as nodes:

            async def ask(name: str) -> None:
                try:
                    nodes_found[name] = await nodes[name].call("GET", "/cluster/status")
                except PeerError as exc:
                    nodes_found[name] = {"node": name, "error": exc.message}

            async with trio.open_nursery() as nursery:
                for name in nodes:
                    nursery.start_soon(ask, name)
            answered = [n for n in nodes_found.values() if "version" in n]
            if answered:
                newest = max(answered, key=lambda n: n["version"])
                text = await nodes[newest["node"]].call("GET", "/cluster/placement")
                table = tables.parse(str(text), f"{newest['node']}'s table")
        haproxy: dict[str, Any] | None = None
        if not args.no_haproxy:
            try:
                states = await server_states(args.haproxy_socket)
                haproxy = {"servers": {srv: state for (_, srv), state in sorted(states.items())}}
                if table is not None:
                    front = HaproxyFront(args.haproxy_socket, args.haproxy_map)
                    haproxy["routes_by_version"] = (
                        table.version if await front.routes_by(table) else None
                    )
            except RuntimeApiError as exc:
                haproxy = {"error": str(exc)}
        return {"nodes": dict(sorted(nodes_found.items())), "haproxy": haproxy}

    found = trio.run(main)
    if args.json:
        print_json(found)
    else:
        print_cluster_status(found)
    return 1 if any("error" in n for n in found["nodes"].values()) else 0


def print_cluster_status(found: Mapping[str, Any]) -> None:
    header = ("node", "table", "slots", "served", "fenced", "open", "shards", "stray", "move")
    rows: list[tuple[str, ...]] = []
    for name, n in found["nodes"].items():
        if "error" in n:
            rows.append((name, f"unreachable: {n['error']}"))
            continue
        move = n.get("move")
        rows.append((
            name, f"v{n['version']}", str(n["slots_in_table"]), str(n["slots_served"]),
            n["fenced"] or "-", str(n["libraries_open"]), str(n["shards"]),
            str(n["stray_shards"]),
            f"{move['move']} ({move['role']}, {move['phase']}, slots {move['slots']}, "
            f"{move['lease_left_s']:.0f} s of lease left)" if move else "-",
        ))
    full = [row for row in rows if len(row) == len(header)]
    widths = [max(len(row[i]) for row in [header, *full]) for i in range(len(header))]
    for row in [header, *rows]:
        if len(row) != len(header):
            print(f"{row[0].ljust(widths[0])}  {row[1]}")
            continue
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    haproxy = found.get("haproxy")
    if haproxy is None:
        return
    if "error" in haproxy:
        print(f"HAProxy: {haproxy['error']}")
        return
    print("HAProxy: " + ", ".join(f"{srv} {state}" for srv, state in haproxy["servers"].items()))
    if "routes_by_version" in haproxy:
        version = haproxy["routes_by_version"]
        print(f"HAProxy's map: table v{version}" if version
              else "HAProxy's map: not the newest table (a move that did not finish?)")


def run_cluster_dev(args: argparse.Namespace) -> int:
    from .cluster.dev import DevClusterError, banner, plan_dev_cluster, run_dev_cluster

    setup_logging(args.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per readiness probe
    if len(args.secret) < 16:
        raise CommandError("--secret must have at least 16 characters")
    try:
        cluster = plan_dev_cluster(
            args.data_dir, args.nodes, port=args.port, secret=args.secret,
            stats_port=args.stats_port,
        )
    except (DevClusterError, ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_dev_cluster, cluster)
                print(banner(cluster), flush=True)
                async for signum in signals:
                    log.info("received %s: stopping the cluster", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    failed = False
    try:
        trio.run(main)
    except* DevClusterError as group:
        for error in group.exceptions:
            print(f"error: {error}", file=sys.stderr)
        failed = True
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
    serve.add_argument(
        "--quickstart", action="store_true",
        help="add the development server's open admin API and /auth/{libraryId} token route "
        "(what cluster-dev runs; never in production)",
    )
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

    litestream = commands.add_parser(
        "litestream-config", help="Litestream configuration replicating every library"
    )
    add_config_option(litestream)
    add_credentials_option(litestream)
    litestream.add_argument("--databases-dir", type=Path, help="instead of the config's")
    litestream.add_argument("--replica", required=True,
                            help="file:///path (or /path) or s3://bucket/path[?endpoint=...]")
    litestream.add_argument("--sync-interval", help="how often WAL changes are shipped "
                            "(Litestream's default: 1s)")
    litestream.add_argument("--meta-dir", type=Path,
                            help="Litestream's local state (default: beside each shard)")
    litestream.add_argument("--out", "-o", type=Path, help="write here (default: stdout)")
    litestream.set_defaults(run=run_litestream_config)

    restore = commands.add_parser(
        "restore", help="libraries back from a Litestream replica (daemon stopped)"
    )
    add_config_option(restore)
    add_credentials_option(restore)
    restore.add_argument("--databases-dir", type=Path, help="instead of the config's")
    restore.add_argument("--from", dest="source", required=True, metavar="REPLICA",
                         help="the replica litestream-config was given")
    restore.add_argument("--library", "-l", action="append",
                         help="restore this library (repeatable; default: every shard of a "
                         "file replica)")
    restore.add_argument("--force", action="store_true",
                         help="replace existing shards (each is kept aside, never deleted)")
    restore.add_argument("--timestamp", help="point in time, RFC 3339 (default: the latest)")
    restore.add_argument("--meta-dir", type=Path,
                         help="the meta-dir given to litestream-config, if any")
    restore.add_argument("--litestream", type=Path,
                         help="the litestream binary (default: the one the extra installed)")
    restore.set_defaults(run=run_restore)
    cluster = commands.add_parser("cluster", help="a cluster's placement table and its front")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    placement = cluster_commands.add_parser(
        "placement", help="write a placement table for a list of nodes",
        description="Without --from: the first table, the slots split evenly in order. With "
        "--from: a new version for a new node list that moves as few slots as possible (for a "
        "node that is gone; running nodes move slots with `cluster move`).",
    )
    placement.add_argument("--nodes", type=node_list, required=True, help="n1,n2,n3")
    placement.add_argument("--from", dest="source", type=Path, help="the table in use")
    placement.add_argument("--out", "-o", type=Path, required=True)
    placement.set_defaults(run=run_cluster_placement)
    front = cluster_commands.add_parser(
        "haproxy-config", help="the HAProxy 2.6 configuration that routes by the table"
    )
    front.add_argument("--nodes", required=True, help="n1=10.0.0.1:3242,n2=10.0.0.2:3242 (every node)")
    front.add_argument("--placement", type=Path, required=True, help="the table file HAProxy reads")
    front.add_argument("--bind", default="127.0.0.1:3242", help="host:port the front listens on")
    front.add_argument("--sync-path", default="/verdant")
    front.add_argument("--admin-path", default="/admin")
    front.add_argument("--stats-port", type=int, default=8404, help="the stats page (0: none)")
    front.add_argument("--socket", type=Path, default=Path("/run/haproxy/admin.sock"),
                       help="the runtime API socket (Debian's default)")
    front.add_argument("--refusal-delay-s", type=float, default=1.0,
                       help="how long a request for a down node's library waits for its 503")
    front.add_argument("--out", "-o", type=Path, help="default: stdout")
    front.set_defaults(run=run_cluster_haproxy_config)
    locate = cluster_commands.add_parser(
        "locate", help="the node that owns each shard or files directory",
        description="For each library shard (or files directory) under PATH: its path, slot "
        "and owner; with --node, only the paths that node owns (to copy a backup's shards to "
        "the nodes that now own them).",
    )
    locate.add_argument("--placement", type=Path, required=True)
    locate.add_argument("--node", help="print only the paths this node owns")
    locate.add_argument("--entries-only", action="store_true",
                        help="take directories as entries, not as lists of them")
    locate.add_argument("paths", type=Path, nargs="+", help="shards, or directories of them")
    locate.set_defaults(run=run_cluster_locate)

    def connection_options(parser: argparse.ArgumentParser, *, moves: bool = True) -> None:
        add_config_option(parser)
        add_credentials_option(parser)
        parser.add_argument("--haproxy-socket", type=Path, default=Path("/run/haproxy/admin.sock"),
                            help="HAProxy's runtime API (default: Debian's)")
        parser.add_argument("--haproxy-map", default=None,
                            help="the placement map as HAProxy loaded it (default: its only map)")
        parser.add_argument("--no-haproxy", action="store_true",
                            help="leave HAProxy alone (it then routes by the old table)")
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
        if moves:
            parser.add_argument(
                "--timeout", type=float, default=60.0,
                help="how long the steps after the switch are retried (s; default 60)",
            )

    move = cluster_commands.add_parser(
        "move", help="move slots to another running node",
        description="Move slots between running nodes with no acknowledged operation lost: "
        "the old owner stops serving them and closes their databases, the new owner copies "
        "and checks them, the table switches on every node and in HAProxy, the new owner "
        "serves, the old one deletes its copies. A failure before the switch undoes the move; "
        "after it, run the same command again to finish it.",
    )
    move.add_argument("slots", nargs="?", help="slots, e.g. 17 or 0:99,512")
    move.add_argument("--library", action="append", help="the slot of this library id (repeatable)")
    move.add_argument("--to", required=True, type=node_name, help="the node that gets the slots")
    connection_options(move)
    move.set_defaults(run=run_cluster_move)
    rebalance = cluster_commands.add_parser(
        "rebalance", help="move slots so that a node list shares them evenly",
        description="The table for the node list that moves as few slots as possible "
        "(`cluster placement --from` computes the same), reached by moves between the running "
        "nodes, one after another. New nodes must be running, in HAProxy's configuration and "
        "in this configuration's [cluster] peers.",
    )
    rebalance.add_argument("--nodes", type=node_list, required=True, help="n1,n2,n3,n4")
    rebalance.add_argument("--slots-per-move", type=int, default=256,
                           help="at most this many slots per move (default 256)")
    connection_options(rebalance)
    rebalance.set_defaults(run=run_cluster_rebalance)
    status = cluster_commands.add_parser(
        "status", help="every node's table version, slots, libraries and moves in progress"
    )
    connection_options(status, moves=False)
    status.set_defaults(run=run_cluster_status)

    dev = commands.add_parser(
        "cluster-dev", help="a development cluster: N nodes and HAProxy on loopback",
        description="N quickstart nodes behind HAProxy, serving through the front what "
        "verdant-server serves. Needs Debian's haproxy. Ctrl-C stops everything.",
    )
    dev.add_argument("--nodes", type=int, default=3)
    dev.add_argument("--port", "-p", type=int, default=int(os.environ.get("VERDANT_PORT", 3242)))
    dev.add_argument("--secret", default=os.environ.get("VERDANT_SECRET", DEFAULT_SECRET))
    dev.add_argument("--data-dir", type=Path, default=Path("verdant-cluster"),
                     help="default: ./verdant-cluster (kept across runs)")
    dev.add_argument("--stats-port", type=int, default=None, help="default: a free port")
    dev.add_argument("--log-level", default="INFO")
    dev.set_defaults(run=run_cluster_dev)
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
