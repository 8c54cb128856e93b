"""One typed settings object for the whole server, and the TOML file it is loaded from.

`load_config(path)` reads a TOML file (stdlib `tomllib`), checks every key against `SCHEMA`, reads
secrets from the environment or files, and returns a frozen `ServerSettings`. Every problem is
reported at once, each naming the file, section and key:

    /etc/verdant-trio/verdant-trio.toml: [server] port: expected an integer 1-65535, got "abc"

Unknown sections and keys are errors (a typo must not silently fall back to a default). Secrets
come, in this order, from `$VERDANT_TOKEN_SECRET` / `$VERDANT_ADMIN_TOKEN`, from `*_file` keys
(which may say `${CREDENTIALS_DIRECTORY}` for systemd's `LoadCredential=`), or from the file
itself; their values are never echoed in errors or logs.

`SCHEMA` is also the documentation: `render_example()` writes `config.example.toml` from it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from ..engine.budget import MEMORY_PER_BYTE
from ..engine.profiles import ProfileSource
from ..engine.settings import (
    DEFAULT_MAX_UPLOAD_BYTES,
    ConnectionSettings,
    CoreSettings,
    LibrarySettings,
)
from ..transport.settings import AppSettings, LingerSettings
from .cluster.placement import Placement, PlacementError, check_node_name
from .cluster.tablefile import read_placement
from .logs import LOG_FORMATS, LOG_LEVELS, LogSettings
from .profiles import load_callable

DEFAULT_MAX_MESSAGE_BYTES = 100 * 1024 * 1024
"""The reference accepts 100 MiB messages; a large first sync needs it (hypercorn's default is
16 MiB, trio-websocket's 1 MiB)."""

EXIT_CONFIG: Final = 78
"""`EX_CONFIG` from sysexits.h; the unit's `RestartPreventExitStatus=` stops a restart loop."""
ENV_TOKEN_SECRET: Final = "VERDANT_TOKEN_SECRET"
ENV_ADMIN_TOKEN: Final = "VERDANT_ADMIN_TOKEN"
ENV_CLUSTER_SECRET: Final = "VERDANT_CLUSTER_SECRET"
MIN_SECRET_CHARS: Final = 16


@dataclass(frozen=True, slots=True)
class ProfilesSettings:
    """Where presence profiles come from (`[profiles]`); neither url nor callable: `{id}`."""

    url: str | None = None
    callable: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 2.0
    cache_ttl_s: float = 300.0
    cache_max_entries: int = 10_000


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """This node's part in a cluster (`[cluster]`): which node it is, and the table it reads."""

    node_id: str
    placement_file: Path
    placement: Placement
    """The table as read (at start, and again on SIGHUP)."""
    secret: str | None = None
    """Authenticates node-to-node requests; never logged."""
    internal_host: str = "127.0.0.1"
    internal_port: int | None = None
    """The node-to-node listener (never behind HAProxy); None: none."""
    peers: Mapping[str, str] = field(default_factory=dict)
    """Other nodes' internal base URLs, by node name."""
    refusal_delay_s: float = 1.0
    move_timeout_s: float = 60.0

    def __repr__(self) -> str:  # no secret in tracebacks
        return (
            f"ClusterSettings(node_id={self.node_id!r}, "
            f"placement_file={str(self.placement_file)!r}, version={self.placement.version})"
        )


@dataclass(frozen=True, slots=True)
class ServerSettings:
    token_secret: str
    core: CoreSettings
    app: AppSettings = field(default_factory=AppSettings)
    host: str = "127.0.0.1"
    port: int = 3242
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    graceful_timeout_s: float = 10.0
    stalled_peer_timeout_s: float = 30.0
    """Abort a connection whose peer acknowledges none of our data for this long (TCP)."""
    linger: LingerSettings = field(default_factory=LingerSettings)
    """How long, and how much, a connection closed after a refusal may still send."""
    files_dir: Path | None = None
    files_public_url: str | None = None
    """Base URL of file links (the public origin behind a proxy); default: the request's."""
    profiles: ProfileSource | None = None
    """A source object (code); takes precedence over `profile_settings`."""
    public_url: str | None = None
    """The origin clients reach us at; used for file links and minted tokens."""
    metrics: bool = True
    logging: LogSettings = field(default_factory=LogSettings)
    profile_settings: ProfilesSettings = field(default_factory=ProfilesSettings)
    cluster: ClusterSettings | None = None
    """Set: this server is one node of a cluster and serves only its slots' libraries."""
    config_path: Path | None = None

    def __repr__(self) -> str:  # keeps the secrets out of tracebacks and debug logs
        return (
            f"ServerSettings(host={self.host!r}, port={self.port}, "
            f"databases_dir={str(self.core.libraries.databases_dir)!r}, "
            f"config_path={str(self.config_path) if self.config_path else None!r})"
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values the log formatter must never print."""
        values = [self.token_secret, self.app.admin_token or ""]
        values.append((self.cluster.secret or "") if self.cluster else "")
        values += [v for k, v in self.profile_settings.headers.items() if k.lower() != "accept"]
        return tuple(v for v in values if len(v) >= 6)

    @property
    def local_url(self) -> str:
        """How tools on this machine reach the daemon (the admin CLI)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def sync_url(self) -> str:
        """The sync endpoint as clients see it (the `url` claim of minted tokens)."""
        return (self.public_url or self.local_url).rstrip("/") + self.app.sync_path


def quickstart_settings(
    *,
    port: int,
    secret: str,
    host: str,
    data_dir: Path,
    sync_path: str = "/verdant",
    admin_path: str = "/admin",
    truancy_minutes: float = 7 * 24 * 60,
) -> ServerSettings:
    """The development server of the Verdant docs: data in the current directory, open admin."""
    return ServerSettings(
        token_secret=secret,
        host=host,
        port=port,
        core=CoreSettings(
            libraries=LibrarySettings(
                databases_dir=data_dir / "verdant-dbs",
                truancy_minutes=truancy_minutes,
            )
        ),
        app=AppSettings(
            sync_path=sync_path,
            admin_path=admin_path,
            admin_open=True,
            dev_token_secret=secret,
        ),
        files_dir=data_dir / "verdant-files",
    )


# -- the schema ------------------------------------------------------------------------------


class Invalid(ValueError):
    """A value is wrong; the text completes "[section] key: ..."."""


Validator = Callable[[Any], Any]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _kind(value: Any) -> str:
    """How a secret's wrong value is described without showing it."""
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)  # fmt: skip


def integer(lo: int, hi: int | None = None) -> Validator:
    expected = f"an integer {lo}-{hi}" if hi is not None else f"an integer >= {lo}"

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected {expected}, got {_show(value)}")
        if value < lo or (hi is not None and value > hi):
            raise Invalid(f"expected {expected}, got {_show(value)}")
        return value

    return check


def number(*, above: float | None = None, at_least: float | None = None) -> Validator:
    expected = (
        f"a number > {above:g}" if above is not None
        else f"a number >= {at_least:g}" if at_least is not None
        else "a number"
    )  # fmt: skip

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"expected {expected}, got {_show(value)}")
        number = float(value)
        if (
            not math.isfinite(number)
            or (above is not None and number <= above)
            or (at_least is not None and number < at_least)
        ):
            raise Invalid(f"expected {expected}, got {_show(value)}")
        return number

    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {_show(value)}")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"expected a non-empty string, got {_show(value)}")
    return value


def choice(*options: str) -> Validator:
    listed = ", ".join(f'"{o}"' for o in options)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise Invalid(f"expected one of {listed}, got {_show(value)}")
        return value.lower()

    return check


def http_url(*, placeholder: str | None = None) -> Validator:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid(f"expected an http(s) URL, got {_show(value)}")
        parts = urlsplit(value.replace("{user_id}", "user") if placeholder else value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Invalid(f"expected an http(s) URL, got {_show(value)}")
        if placeholder and placeholder not in value:
            raise Invalid(f"expected a URL containing {placeholder}, got {_show(value)}")
        return value.rstrip("/") if not placeholder else value

    return check


def url_path(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or any(c in value for c in "?# \t\n")
    ):
        raise Invalid(f'expected a path starting with "/", got {_show(value)}')
    return value.rstrip("/") or "/"


def origins(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise Invalid(f'expected an array of origins (or ["*"]), got {_show(value)}')
    for origin in value:
        if origin != "*" and (
            urlsplit(origin).scheme not in ("http", "https") or urlsplit(origin).path
        ):
            raise Invalid(f'expected origins like "https://app.example.com", got {_show(origin)}')
    return tuple(value)


def string_table(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise Invalid(f"expected a table of strings, got {_show(value)}")
    return dict(value)


_ENV_REFERENCE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def path_value(environ: Mapping[str, str]) -> Validator:
    """A path; `${NAME}` takes an environment variable; relative means from the working dir."""

    def check(value: Any) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise Invalid(f"expected a path, got {_show(value)}")

        def expand(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                hint = " (systemd sets it for LoadCredential=)" if "CREDENTIALS" in name else ""
                raise Invalid(f"${{{name}}} is not set{hint}, in {_show(value)}")
            return environ[name]

        return Path(_ENV_REFERENCE.sub(expand, value)).expanduser().absolute()

    return check


def node_name(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a node name, got {_show(value)}")
    try:
        return check_node_name(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def peer_urls(value: Any) -> dict[str, str]:
    table = string_table(value)
    check_url = http_url()
    for name, url in table.items():
        try:
            check_node_name(name)
        except ValueError as exc:
            raise Invalid(f"{exc}, in peers") from None
        try:
            check_url(url)
        except Invalid:
            raise Invalid(f"expected an http(s) URL for peer {name}, got {_show(url)}") from None
    return {name: url.rstrip("/") for name, url in table.items()}


def module_function(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[\w.]+:[\w.]+", value):
        raise Invalid(f'expected "package.module:function", got {_show(value)}')
    try:
        load_callable(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return value


@dataclass(frozen=True, slots=True)
class Key:
    section: str
    name: str
    check: Validator | None
    """None: the path validator (needs the environment)."""
    default: Any
    doc: str
    example: Any = None
    """Shown commented out in the example file when there is no default."""
    secret: bool = False
    reloadable: bool = False


def _default(cls: type, name: str) -> Any:
    for f in fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


SECTIONS: Final = {
    "server": "Where we listen and what we serve.",
    "auth": (
        "Secrets. Prefer files (systemd LoadCredential=) or the environment:\n"
        f"${ENV_TOKEN_SECRET} and ${ENV_ADMIN_TOKEN} override everything here."
    ),
    "storage": "Library databases: one SQLite file per library.",
    "files": "Files attached to documents.",
    "limits": "Limits that protect the server; the defaults suit real Verdant clients.",
    "profiles": (
        "User profiles shown in presence. Set url or callable (not both); without either a\n"
        'profile is {"id": userId}. Lookups are cached; a failed or slow one falls back to\n'
        '{"id": userId} (cached for at most 30 s). Reloaded on SIGHUP.'
    ),
    "logging": "Logs go to stderr, one line per event (journald-friendly). Reloaded on SIGHUP.",
    "cluster": (
        "One node of a cluster behind HAProxy (README: Running a cluster). Set node_id and\n"
        "placement_file to turn it on: the node then serves only the libraries whose slot the\n"
        "table gives it, and refuses the others with 503 (clients retry). SIGHUP re-reads the\n"
        "table: slots lost are released (their sockets closed, their databases closed),\n"
        "slots gained are served."
    ),
}

_LIB = LibrarySettings
_CORE = CoreSettings
_CONN = ConnectionSettings
_LINGER = LingerSettings

SCHEMA: Final[tuple[Key, ...]] = (
    Key("server", "host", text, "127.0.0.1",
        'Address to listen on; "0.0.0.0" or "::" for every interface.'),
    Key("server", "port", integer(1, 65535), 3242, "TCP port."),
    Key("server", "sync_path", url_path, AppSettings().sync_path,
        "Path of the sync endpoint (HTTP push/pull, websocket, file upload); the `url` claim\n"
        "of your tokens points here."),
    Key("server", "public_url", http_url(), None,
        "Origin clients reach this server at (behind a proxy). Used for file links and by\n"
        "`verdant-trio token`. Default: the origin of each request.",
        example="https://sync.example.com"),
    Key("server", "cors_origins", origins, ["*"],
        'Browser origins allowed to call the HTTP endpoints. ["*"] allows any origin, which is\n'
        "safe because sync tokens are bearer tokens, not cookies."),
    Key("server", "admin_path", url_path, "/admin",
        "Path prefix of the admin API (served only when an admin token is set)."),
    Key("server", "metrics", boolean, True,
        "Serve Prometheus metrics at /metrics (/healthz and /readyz are always served)."),
    Key("auth", "token_secret", text, None,
        "Secret that signs sync tokens (HS256); your app's TokenProvider uses the same one.\n"
        f"Required: here, in token_secret_file, or in ${ENV_TOKEN_SECRET}.",
        example="use-token_secret_file-instead", secret=True),
    Key("auth", "token_secret_file", None, None,
        "File holding the token secret (surrounding whitespace ignored).",
        example="${CREDENTIALS_DIRECTORY}/token-secret"),
    Key("auth", "admin_token", text, None,
        "Bearer token for the admin API and `verdant-trio admin`. Unset: admin API off.",
        example="use-admin_token_file-instead", secret=True),
    Key("auth", "admin_token_file", None, None, "File holding the admin token.",
        example="${CREDENTIALS_DIRECTORY}/admin-token"),
    Key("storage", "databases_dir", None, "verdant-dbs",
        "Directory of the library databases. Relative paths start at the working directory\n"
        "(the systemd unit's is the state directory)."),
    Key("storage", "truancy_minutes", number(above=0), _default(_LIB, "truancy_minutes"),
        "A replica silent this long is truant: history stops waiting for it, and it resets\n"
        "when it returns."),
    Key("storage", "idle_close_s", number(above=0), _default(_LIB, "idle_close_s"),
        "Close a library's database this long after its last client left."),
    Key("storage", "restore_grace_s", number(at_least=0), _default(_LIB, "restore_grace_s"),
        "A library restored from a replica (`verdant-trio restore`) asks every replica that\n"
        "returns for its whole history, to recover what the restore lacked. It stops once\n"
        "every replica it knows has done so and this long has passed since the restore (time\n"
        "for replicas the restored copy cannot know about), or after truancy_minutes."),
    Key("storage", "synchronous", choice("full", "normal"), "normal",
        '"normal" (what the Node server runs with): every acknowledged change survives a crash\n'
        "or kill of the server process; after a power cut or OS crash the database is\n"
        'consistent but the last acknowledged changes may be lost. "full": they survive a\n'
        "power cut too, at the price of an fsync per batch."),
    Key("files", "enabled", boolean, True, "Accept file uploads and serve files."),
    Key("files", "root", None, "verdant-files", "Directory of uploaded files."),
    Key("files", "max_upload_bytes", integer(1), DEFAULT_MAX_UPLOAD_BYTES,
        "Largest accepted file."),
    Key("files", "public_url", http_url(), None,
        "Base URL of file links. Default: [server] public_url, else the request's origin.",
        example="https://sync.example.com"),
    Key("files", "expiration_days", number(at_least=0), _default(_LIB, "file_expiration_days"),
        "Delete a file this many days after the last document referring to it dropped it."),
    Key("limits", "max_message_bytes", integer(1024), DEFAULT_MAX_MESSAGE_BYTES,
        "Largest websocket message and HTTP sync body (a big first sync needs room)."),
    Key("limits", "message_memory_bytes", integer(1024 * 1024),
        _default(_CORE, "message_memory_bytes"),
        "Memory that large websocket messages (over 64 KiB) may hold at once, server-wide.\n"
        "Each reserves three times its size (what receiving and parsing one costs) before\n"
        "its payload is read, until the library has handled it; the others wait (TCP holds\n"
        "their senders back). At least three times max_message_bytes; the default leaves\n"
        "room for one message of the largest size and several smaller ones."),
    Key("limits", "message_memory_wait_s", number(above=0),
        _default(_CORE, "message_memory_wait_s"),
        "A large message that cannot get its memory within this is refused: its connection\n"
        "is closed with 1013 (try again later) and the client reconnects."),
    Key("limits", "max_connections", integer(1), _default(_CORE, "max_connections"),
        "Open websockets at most; more are refused with 503 until some close."),
    Key("limits", "outbound_queue_messages", integer(1), _default(_CONN, "outbound_queue"),
        "Messages queued for one connection that does not read; past it the connection is\n"
        "closed (1013) and the client reconnects and resyncs."),
    Key("limits", "heartbeat_timeout_s", number(above=0), _default(_CONN, "idle_timeout_s"),
        "Close a websocket that sends nothing, not even a heartbeat, for this long."),
    Key("limits", "max_concurrent_syncs", integer(1), _default(_CORE, "max_concurrent_syncs"),
        "Initial syncs computed at once; the rest queue (a reconnect storm after a restart)."),
    Key("limits", "max_concurrent_handshakes", integer(1),
        _default(_CORE, "max_concurrent_handshakes"), "Websocket handshakes in progress at once."),
    Key("limits", "handshake_timeout_s", number(above=0), _default(_CORE, "handshake_timeout_s"),
        "A handshake that cannot start within this is refused with 503."),
    Key("limits", "stalled_peer_timeout_s", number(above=0), 30.0,
        "Abort a connection whose peer acknowledges none of our data for this long (a\n"
        "client that stopped reading, or vanished): the kernel's TCP_USER_TIMEOUT, Linux.\n"
        "A slow consumer's close (1013) also waits up to this long for it to read on."),
    Key("limits", "linger_timeout_s", number(at_least=0), _default(_LINGER, "timeout_s"),
        "An HTTP connection closed after an answer (often a refusal, 413/401/400, sent before\n"
        "the request's body arrived) is still read, and what the client sends is discarded,\n"
        "so that clients that write their whole body before reading (fetch, urllib) get the\n"
        "answer instead of a reset. For this long at most; 0 turns it off."),
    Key("limits", "linger_read_timeout_s", number(above=0), _default(_LINGER, "read_timeout_s"),
        "While lingering, a client that sends nothing for this long is closed."),
    Key("limits", "linger_max_bytes", integer(0), _default(_LINGER, "max_bytes"),
        "While lingering, bytes discarded at most; past them the connection is reset. Keep it\n"
        "above [files] max_upload_bytes so that a refused upload can be read to its end."),
    Key("limits", "shutdown_timeout_s", number(at_least=0), 10.0,
        "On SIGTERM, how long requests in flight get to finish before they are cancelled."),
    Key("profiles", "url", http_url(placeholder="{user_id}"), None,
        "GET this (with {user_id} filled in) for a user's profile: a JSON object.",
        example="https://app.internal/profiles/{user_id}", reloadable=True),
    Key("profiles", "callable", module_function, None,
        "A Python function (sync or async) or an object with async get(user_id).",
        example="myapp.profiles:get_profile", reloadable=True),
    Key("profiles", "headers", string_table, {},
        "Headers sent with url (e.g. an internal Authorization header); never logged.",
        reloadable=True),
    Key("profiles", "timeout_s", number(above=0), 2.0,
        "A lookup slower than this falls back to {id}.", reloadable=True),
    Key("profiles", "cache_ttl_s", number(at_least=0), 300.0, "How long a profile is reused.",
        reloadable=True),
    Key("profiles", "cache_max_entries", integer(1), 10_000, "Profiles kept in memory at most.",
        reloadable=True),
    Key("logging", "level", choice(*LOG_LEVELS), "info",
        " | ".join(f'"{level}"' for level in LOG_LEVELS) + ".", reloadable=True),
    Key("logging", "format", choice(*LOG_FORMATS), "logfmt",
        '"logfmt" (key=value) or "json"; library=, user= and replica= are fields in both.',
        reloadable=True),
    Key("logging", "timestamps", boolean, True,
        "Start each line with ts=. journald adds its own; false keeps lines shorter there.",
        reloadable=True),
    Key("logging", "access_log", boolean, False,
        "One line per HTTP request (method, path without query, status, duration).",
        reloadable=True),
    Key("cluster", "node_id", node_name, None,
        "This node's name in the placement table (1-63 letters, digits, '-' or '_').",
        example="n1"),
    Key("cluster", "placement_file", None, None,
        "The placement table (`verdant-trio cluster placement` writes the first one). Every\n"
        "node and HAProxy read the same table. Re-read on SIGHUP; an older version than the\n"
        "one running is refused.",
        example="/etc/verdant-trio/placement.map", reloadable=True),
    Key("cluster", "secret", text, None,
        "Shared by the nodes of a cluster: authenticates node-to-node requests (the internal\n"
        f"listener). Required with internal_port; or secret_file, or ${ENV_CLUSTER_SECRET}.",
        example="use-secret_file-instead", secret=True),
    Key("cluster", "secret_file", None, None, "File holding the cluster secret.",
        example="${CREDENTIALS_DIRECTORY}/cluster-secret"),
    Key("cluster", "internal_host", text, "127.0.0.1",
        "Address of the node-to-node listener (moving slots); never put it behind HAProxy."),
    Key("cluster", "internal_port", integer(1, 65535), None,
        "Port of the node-to-node listener. Unset: none (slots cannot move to or from here).",
        example=3300),
    Key("cluster", "peers", peer_urls, {},
        "The other nodes' node-to-node listeners, by node name.", reloadable=True),
    Key("cluster", "refusal_delay_s", number(at_least=0), _default(_CORE, "refusal_delay_s"),
        "A websocket for a library of another node is held this long before its 503:\n"
        "@verdant-web/store reconnects a refused socket at once, forever."),
    Key("cluster", "move_timeout_s", number(above=0), 60.0,
        "A node's lease on its part of a move (release, copy, switch): a move that takes\n"
        "longer is undone, and one whose command went away ends safely on each node after it\n"
        "(README: Moving slots). Raise it on every node to move big libraries."),
)  # fmt: skip

KEYS: Final = {(k.section, k.name): k for k in SCHEMA}


class ConfigError(Exception):
    """The configuration cannot be used; `problems` each name their section and key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    settings: ServerSettings
    values: Mapping[tuple[str, str], Any]
    """Every key's checked value (secrets resolved), to tell what a reload changes."""

    def changed_keys(self, other: LoadedConfig) -> list[tuple[str, str]]:
        return [key for key in KEYS if self.values.get(key) != other.values.get(key)]


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def check_document(
    data: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[dict[tuple[str, str], Any], list[str]]:
    """Every key checked (defaults filled in) and the problems found, in file order."""
    problems: list[str] = []
    values: dict[tuple[str, str], Any] = {}
    paths = path_value(environ)
    for name, section in data.items():
        if name not in SECTIONS:
            if not isinstance(section, dict):
                problems.append(
                    f"{name}: unknown top-level key; keys belong in a section such as [server]"
                )
            else:
                problems.append(f"[{name}]: unknown section{_suggest(name, list(SECTIONS))}")
            continue
        if not isinstance(section, dict):
            problems.append(f"[{name}]: expected a table, got {_show(section)}")
            continue
        known = [k.name for k in SCHEMA if k.section == name]
        for key, raw in section.items():
            spec = KEYS.get((name, key))
            if spec is None:
                problems.append(f"[{name}] {key}: unknown key{_suggest(key, known)}")
                continue
            try:
                check = spec.check or paths
                values[(name, key)] = check(raw)
            except Invalid as exc:
                message = str(exc)
                if spec.secret:
                    message = f"expected a non-empty string, got {_kind(raw)}"
                problems.append(f"[{name}] {key}: {message}")
    for spec in SCHEMA:
        key = (spec.section, spec.name)
        reported = any(p.startswith(f"[{spec.section}] {spec.name}:") for p in problems)
        if key not in values and not reported:
            default = spec.default
            if spec.check is None and default is not None:
                default = paths(default)
            elif spec.check is url_path or spec.check is origins:
                default = spec.check(default)
            values[key] = default
    return values, problems


def _read_secret(path: Path) -> str:
    try:
        data = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise Invalid(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise Invalid(f"{path} is not UTF-8 text") from None
    if not data:
        raise Invalid(f"{path} is empty")
    return data


def resolve_secrets(
    values: dict[tuple[str, str], Any], environ: Mapping[str, str], problems: list[str]
) -> None:
    """Put each secret's value under its key: environment, else `*_file`, else inline.

    A secret that cannot be resolved is left out of `values` (its problem is reported).
    """
    for section, key, env_name, required in (
        ("auth", "token_secret", ENV_TOKEN_SECRET, True),
        ("auth", "admin_token", ENV_ADMIN_TOKEN, False),
        ("cluster", "secret", ENV_CLUSTER_SECRET, False),
    ):
        inline = values.get((section, key))
        file = values.get((section, f"{key}_file"))
        secret: str | None = environ.get(env_name) or None
        if secret is None:
            if inline is not None and file is not None:
                values.pop((section, key), None)
                problems.append(f"[{section}] {key}: set either {key} or {key}_file, not both")
                continue
            if file is not None:
                try:
                    secret = _read_secret(file)
                except Invalid as exc:
                    values.pop((section, key), None)
                    problems.append(f"[{section}] {key}_file: {exc}")
                    continue
            else:
                secret = inline
        if secret is None:
            if required:
                problems.append(
                    f"[{section}] {key}: required; set {key}, {key}_file or ${env_name}"
                )
            continue
        if len(secret) < MIN_SECRET_CHARS:
            values.pop((section, key), None)
            problems.append(
                f"[{section}] {key}: too short ({len(secret)} characters); use at least "
                f"{MIN_SECRET_CHARS}, ideally 32 random bytes"
            )
            continue
        values[(section, key)] = secret


def cross_check(values: Mapping[tuple[str, str], Any], problems: list[str]) -> None:
    memory, largest = values.get(("limits", "message_memory_bytes")), values.get(
        ("limits", "max_message_bytes")
    )
    if isinstance(memory, int) and isinstance(largest, int) and memory < MEMORY_PER_BYTE * largest:
        problems.append(
            f"[limits] message_memory_bytes: {memory} cannot hold one message of "
            f"max_message_bytes ({largest}); use at least {MEMORY_PER_BYTE * largest}"
        )
    if values.get(("profiles", "url")) and values.get(("profiles", "callable")):
        problems.append("[profiles] callable: set either url or callable, not both")
    if values.get(("server", "sync_path")) == values.get(("server", "admin_path")):
        problems.append("[server] admin_path: must differ from sync_path")
    reserved = {"/healthz", "/readyz", "/metrics", "/files"}
    for key in ("sync_path", "admin_path"):
        if values.get(("server", key)) in reserved:
            taken = values[("server", key)]
            problems.append(f"[server] {key}: {taken!r} is taken by another route")
    _cross_check_cluster(values, problems)


_CLUSTER_ONLY: Final = ("placement_file", "secret", "secret_file", "internal_port")
"""[cluster] keys without a default: setting one means a cluster was meant (node_id needed)."""


def _cross_check_cluster(values: Mapping[tuple[str, str], Any], problems: list[str]) -> None:
    node_id = values.get(("cluster", "node_id"))
    if node_id is None:
        for key in _CLUSTER_ONLY:
            if values.get(("cluster", key)) is not None:
                problems.append(f"[cluster] node_id: required with [cluster] {key}")
                return
        return
    if values.get(("cluster", "placement_file")) is None:
        problems.append("[cluster] placement_file: required with node_id")
    peers = values.get(("cluster", "peers")) or {}
    if node_id in peers:
        problems.append(f"[cluster] peers: lists this node ({node_id}) itself")
    port = values.get(("cluster", "internal_port"))
    if port is not None:
        if values.get(("cluster", "secret")) is None and not any(
            p.startswith("[cluster] secret") for p in problems
        ):
            problems.append(
                "[cluster] secret: required with internal_port (node-to-node requests are "
                f"authenticated with it); set secret, secret_file or ${ENV_CLUSTER_SECRET}"
            )
        if port == values.get(("server", "port")):
            problems.append("[cluster] internal_port: must differ from [server] port")


def read_cluster_placement(
    values: Mapping[tuple[str, str], Any], problems: list[str]
) -> Placement | None:
    """The placement table a cluster node starts (or reloads) with; its problems named."""
    path = values.get(("cluster", "placement_file"))
    if values.get(("cluster", "node_id")) is None or path is None:
        return None
    try:
        return read_placement(path)
    except PlacementError as exc:
        problems.append(f"[cluster] placement_file: {exc}")
        return None


def build_settings(
    values: Mapping[tuple[str, str], Any],
    config_path: Path | None,
    placement: Placement | None = None,
) -> ServerSettings:
    def v(section: str, name: str) -> Any:
        return values[(section, name)]

    cluster = None
    if placement is not None:
        cluster = ClusterSettings(
            node_id=v("cluster", "node_id"),
            placement_file=v("cluster", "placement_file"),
            placement=placement,
            secret=values.get(("cluster", "secret")),
            internal_host=v("cluster", "internal_host"),
            internal_port=v("cluster", "internal_port"),
            peers=v("cluster", "peers"),
            refusal_delay_s=v("cluster", "refusal_delay_s"),
            move_timeout_s=v("cluster", "move_timeout_s"),
        )

    origins_value: tuple[str, ...] = v("server", "cors_origins")
    public_url: str | None = v("server", "public_url")
    max_message_bytes: int = v("limits", "max_message_bytes")
    libraries = LibrarySettings(
        databases_dir=v("storage", "databases_dir"),
        truancy_minutes=v("storage", "truancy_minutes"),
        idle_close_s=v("storage", "idle_close_s"),
        file_expiration_days=v("files", "expiration_days"),
        synchronous=v("storage", "synchronous").upper(),
        restore_grace_s=v("storage", "restore_grace_s"),
    )
    core = CoreSettings(
        libraries=libraries,
        connections=ConnectionSettings(
            outbound_queue=v("limits", "outbound_queue_messages"),
            idle_timeout_s=v("limits", "heartbeat_timeout_s"),
            slow_close_timeout_s=v("limits", "stalled_peer_timeout_s"),
        ),
        max_connections=v("limits", "max_connections"),
        max_concurrent_syncs=v("limits", "max_concurrent_syncs"),
        max_concurrent_handshakes=v("limits", "max_concurrent_handshakes"),
        handshake_timeout_s=v("limits", "handshake_timeout_s"),
        max_upload_bytes=v("files", "max_upload_bytes"),
        message_memory_bytes=v("limits", "message_memory_bytes"),
        message_memory_wait_s=v("limits", "message_memory_wait_s"),
        refusal_delay_s=v("cluster", "refusal_delay_s"),
    )
    app = AppSettings(
        sync_path=v("server", "sync_path"),
        admin_path=v("server", "admin_path"),
        admin_token=values.get(("auth", "admin_token")),
        cors_origins=None if "*" in origins_value else origins_value,
        max_body_bytes=max_message_bytes,
    )
    return ServerSettings(
        token_secret=values.get(("auth", "token_secret")) or "",
        core=core,
        app=app,
        host=v("server", "host"),
        port=v("server", "port"),
        max_message_bytes=max_message_bytes,
        graceful_timeout_s=v("limits", "shutdown_timeout_s"),
        stalled_peer_timeout_s=v("limits", "stalled_peer_timeout_s"),
        linger=LingerSettings(
            timeout_s=v("limits", "linger_timeout_s"),
            read_timeout_s=v("limits", "linger_read_timeout_s"),
            max_bytes=v("limits", "linger_max_bytes"),
        ),
        files_dir=v("files", "root") if v("files", "enabled") else None,
        files_public_url=v("files", "public_url") or public_url,
        public_url=public_url,
        metrics=v("server", "metrics"),
        logging=LogSettings(
            level=v("logging", "level"),
            format=v("logging", "format"),
            timestamps=v("logging", "timestamps"),
            access_log=v("logging", "access_log"),
        ),
        profile_settings=ProfilesSettings(
            url=v("profiles", "url"),
            callable=v("profiles", "callable"),
            headers=v("profiles", "headers"),
            timeout_s=v("profiles", "timeout_s"),
            cache_ttl_s=v("profiles", "cache_ttl_s"),
            cache_max_entries=v("profiles", "cache_max_entries"),
        ),
        cluster=cluster,
        config_path=config_path,
    )


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, str], Any] | None = None,
    require_secrets: bool = True,
) -> LoadedConfig:
    """Read, check and build; raises `ConfigError` listing every problem.

    `overrides` (command-line flags) replace file values and are checked the same way. Tools
    that need no secret, or only one (backup, admin), pass `require_secrets=False`: a secret
    that cannot be resolved is then empty (`""`/None) instead of an error.
    """
    environ = os.environ if environ is None else environ
    config_path = Path(path).absolute()
    source = str(config_path)
    try:
        data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(source, ["the file is not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"invalid TOML: {exc}"]) from None
    for (section, name), value in (overrides or {}).items():
        data.setdefault(section, {})
        if isinstance(data[section], dict):
            data[section][name] = value
    values, problems = check_document(data, environ)
    secret_problems: list[str] = []
    resolve_secrets(values, environ, secret_problems)
    if require_secrets:
        problems += secret_problems
    cross_check(values, problems)
    placement = read_cluster_placement(values, problems)
    if problems:
        raise ConfigError(source, problems)
    return LoadedConfig(build_settings(values, config_path, placement), values)


# -- the documented example -------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


EXAMPLE_HEADER: Final = """\
# verdant-trio configuration: `verdant-trio serve --config verdant-trio.toml`.
#
# Every key is listed with its default; keys without a default are commented out. Unknown keys
# are errors. Check a file without starting the server: `verdant-trio check-config FILE`.
# SIGHUP (`systemctl reload verdant-trio`) re-reads [logging], [profiles] and the cluster's
# placement table; other changes need a restart.
# This file is generated: `verdant-trio example-config > config.example.toml`.
"""


def render_example() -> str:
    lines = [EXAMPLE_HEADER.rstrip("\n")]
    for section, doc in SECTIONS.items():
        lines.append("")
        lines.extend(f"# {line}".rstrip() for line in doc.splitlines())
        lines.append(f"[{section}]")
        for spec in SCHEMA:
            if spec.section != section:
                continue
            lines.append("")
            lines.extend(f"# {line}".rstrip() for line in spec.doc.splitlines())
            if spec.default is None:
                lines.append(f"# {spec.name} = {_toml_value(spec.example)}")
            else:
                lines.append(f"{spec.name} = {_toml_value(spec.default)}")
    return "\n".join(lines) + "\n"
