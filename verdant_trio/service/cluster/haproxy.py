"""The HAProxy 2.6 configuration that sends every request to the node owning its library's slot.

HAProxy only reads the token to route; the node verifies it. The library comes from:

- the token's `lib` claim, for the sync path: `Authorization: Bearer` (HTTP sync, uploads, file
  info), and for websocket upgrades `Sec-WebSocket-Protocol: Bearer, <token>` or else
  `?token=`, in the order the server reads them;
- the URL for file downloads: `/files/<slot>/<library>/<file>/<name>` carries the slot (cluster
  nodes mint that form), and the single-node form `/files/<library>/<file>/<name>` is routed
  by the library name when it is a safe name (it is then its own routing key); an encoded
  (`~...`) name goes to any node, which answers with a redirect to the slot form;
- the URL for the admin API: `<admin>/libraries/<percent-encoded id>/...`.

The claim is read from the base64url-decoded payload as written, not with `jwt_payload_query`
or `json_query`: their JSON decoder (mjson) turns `\\u00fc` into the single byte 0xFC and
gives up on any other `\\uXXXX` (no value at all), which PyJWT writes for every non-ASCII
character. Instead a `regsub` takes the `lib` string as written and `JSON_KEY_PASSES` turn it
into the routing key; `crc32` and `mod` give the slot, `map_int` on the placement table the
node (`placement` says why that equals what every node computes).

Requests without a library (CORS preflights, a missing or malformed token, the dev token route)
go to any healthy node, which answers them or refuses them as it would alone. A library request
never goes anywhere but its owner: one server per node backend, no redispatch. While the owner
is down, requests for its libraries are held for `refusal_delay_s` and refused with 503 and a
Verdant error body, because `@verdant-web/store` 3.6.3 reconnects a refused websocket at once,
with no backoff, and would otherwise spin.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .placement import NON_ASCII_MARK, SLOT_COUNT, Placement, check_node_name

OUTSIDE_KEY: Final = "[^]A-Za-z0-9 !#$%()*,.:;?@^_{|}~[-]"
"""PCRE: one byte that is not in `placement.KEY_CHARACTERS`."""
RAW_NON_ASCII: Final = r"[\xC0-\xFF][\x80-\xBF]*"
"""PCRE (byte mode): one UTF-8 character outside ASCII, its lead byte and continuation bytes."""
JSON_KEY_PASSES: Final = (
    (r"\\[^u]", ""),  # \" \\ \/ \b \f \n \r \t: characters the key drops
    (r"\\u00[0-7][0-9A-Fa-f]", ""),  # an escaped ASCII character: no writer escapes a kept one
    (r"\\u[Dd][C-Fc-f][0-9A-Fa-f]{2}", ""),  # a surrogate pair's 2nd half: the 1st one counts
    (r"\\u[0-9A-Fa-f]{4}", NON_ASCII_MARK),  # any other escape: one non-ASCII character
    (RAW_NON_ASCII, NON_ASCII_MARK),
    (OUTSIDE_KEY, ""),
)
"""`regsub` passes from a JSON string as written to the routing key.

In order, each global and left to right: after the first pass every backslash left starts a
`\\uXXXX` escape (an escaped backslash went with its partner), so no later pass can misread
`\\\\u0041`, the id `\\u0041`, as an escape.
"""
URL_KEY_PASSES: Final = ((RAW_NON_ASCII, NON_ASCII_MARK), (OUTSIDE_KEY, ""))
"""`regsub` passes from a percent-decoded library id to its routing key."""
LIB_CLAIM: Final = r'^.*"lib"[[:space:]]*:[[:space:]]*"((\\.|[^"\\])*)".*$'
"""PCRE: the whole payload, capturing the last `"lib"` string member as written.

In JSON text a `"` inside a string is always escaped, so `"lib":"` only matches a member name.
The last one wins, as in Python's and JavaScript's JSON parsers for a repeated member.
"""
HAS_LIB_CLAIM: Final = r'"lib"[[:space:]]*:[[:space:]]*"'

NODE_BACKEND_PREFIX: Final = "node_"
ANY_BACKEND: Final = "any_node"
NODE_HEADER: Final = "X-Verdant-Node"
SLOT_HEADER: Final = "X-Verdant-Slot"
UNAVAILABLE_BODY: Final = (
    '{"code":5030,"message":"the node that owns this library is unavailable; retry later"}'
)
_HOST: Final = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")
_URL_PATH: Final = re.compile(r"(/[A-Za-z0-9._~-]+)*/?")


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """Where HAProxy reaches a node: its name in the placement table and its HTTP address."""

    name: str
    host: str
    port: int

    def __post_init__(self) -> None:
        check_node_name(self.name)
        if not _HOST.fullmatch(self.host):
            raise ValueError(f"node {self.name}: invalid host {self.host!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"node {self.name}: invalid port {self.port!r}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_node(spec: str) -> NodeAddress:
    """`name=host:port` (IPv6 as `name=[::1]:port`), as the CLI takes nodes."""
    name, sep, address = spec.partition("=")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not port.isdigit():
        raise ValueError(f"expected a node as name=host:port, got {spec!r}")
    return NodeAddress(name.strip(), host.strip(), int(port))


@dataclass(frozen=True, slots=True)
class HaproxySettings:
    """What the generated configuration needs beyond the placement and the nodes."""

    placement_path: Path
    """The table file, read by HAProxy as its map: absolute, so HAProxy's working directory
    does not matter."""
    bind_host: str = "127.0.0.1"
    bind_port: int = 3242
    sync_path: str = "/verdant"
    admin_path: str = "/admin"
    stats_host: str = "127.0.0.1"
    stats_port: int | None = 8404
    """The stats page (`None`: no stats page); the runtime API is the better tool for scripts."""
    runtime_socket: Path | None = None
    """The runtime API socket (`set map`, `prepare map`/`commit map`, `show stat`), admin level."""
    maxconn: int | None = None
    """Connections HAProxy accepts at once; `None`: what its file-descriptor limit allows."""
    connect_timeout_s: float = 5
    client_timeout_s: float = 60
    server_timeout_s: float = 60
    tunnel_timeout_s: float = 3600
    """An open websocket may be idle this long; clients heartbeat far more often."""
    http_request_timeout_s: float = 10
    keep_alive_timeout_s: float = 10
    fin_timeout_s: float = 30
    refusal_delay_s: float = 1
    """How long a request for a library whose node is down waits before its 503."""
    check_interval_s: float = 2
    check_fall: int = 2
    check_rise: int = 2
    log_target: str | None = "stderr"
    """`log <target>` for HAProxy's own and request logs (`stderr` suits systemd); `None`: none."""

    def __post_init__(self) -> None:
        if not self.placement_path.is_absolute():
            raise ValueError(f"the placement path must be absolute, got {self.placement_path}")
        for what, path in (("placement", self.placement_path), ("socket", self.runtime_socket)):
            if path is not None and not _plain_path(str(path)):
                raise ValueError(f"the {what} path {str(path)!r} has characters HAProxy would parse")
        for what, url_path in (("sync", self.sync_path), ("admin", self.admin_path)):
            if url_path and (not url_path.startswith("/") or not _URL_PATH.fullmatch(url_path)):
                raise ValueError(f"the {what} path {url_path!r} must be a plain /path")
        for host in (self.bind_host, self.stats_host):
            if not _HOST.fullmatch(host):
                raise ValueError(f"invalid host {host!r}")


def _plain_path(path: str) -> bool:
    return bool(path) and not any(ch in path for ch in "'\"\\ #\n\r\t$")


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _prefix_acls(name: str, path: str) -> list[str]:
    """ACL `name` for `path` and everything below it (`/`: everything); declarations OR."""
    stripped = path.rstrip("/")
    if not stripped:
        return [_rule("acl", name, "always_true")]
    return [_rule("acl", name, "path", stripped), _rule("acl", name, "path_beg", f"{stripped}/")]


def render_config(
    placement: Placement, nodes: Sequence[NodeAddress], settings: HaproxySettings
) -> str:
    """A complete configuration: `haproxy -f FILE` (2.6) serves the cluster with it.

    Every node in `nodes` gets a backend, so slots can move to a node that owns none yet; every
    owner in the table must be in `nodes`.
    """
    names = [node.name for node in nodes]
    if len(set(names)) != len(names):
        raise ValueError("node names must be unique")
    unknown = sorted(set(placement.nodes) - set(names))
    if unknown:
        raise ValueError(f"the placement names nodes with no address: {', '.join(unknown)}")
    sections = [_global(settings), _defaults(settings), _frontend(settings)]
    sections += [_node_backend(node, settings) for node in nodes]
    sections.append(_any_backend(nodes, settings))
    if settings.stats_port is not None:
        sections.append(_stats(settings))
    header = [
        "# Generated by `verdant-trio cluster haproxy-config`: regenerate it, do not edit it.",
        f"# Placement table {settings.placement_path} (version {placement.version} when generated):",
        "# HAProxy reads it at start, and the runtime API changes it while HAProxy runs.",
    ]
    return "\n\n".join("\n".join(section) for section in [header, *sections]) + "\n"


def _rule(*words: str) -> str:
    return "    " + " ".join(words)


def _global(s: HaproxySettings) -> list[str]:
    lines = ["global"]
    if s.maxconn is not None:
        lines.append(_rule("maxconn", str(s.maxconn)))
    if s.log_target:
        lines.append(_rule("log", s.log_target, "format short local0 info"))
    if s.runtime_socket is not None:
        lines.append(_rule("stats socket", str(s.runtime_socket), "mode 600 level admin"))
        lines.append(_rule("stats timeout 30s"))
    return lines


def _defaults(s: HaproxySettings) -> list[str]:
    return [
        "defaults",
        _rule("mode http"),
        *([_rule("log global"), _rule("option httplog"), _rule("option dontlognull")]
          if s.log_target else [_rule("no log")]),
        _rule("option forwardfor"),
        _rule("# a library is served by its owner or by no one"),
        _rule("no option redispatch"),
        _rule("retries 2"),
        _rule("timeout connect", _ms(s.connect_timeout_s)),
        _rule("timeout client", _ms(s.client_timeout_s)),
        _rule("timeout server", _ms(s.server_timeout_s)),
        _rule("timeout tunnel", _ms(s.tunnel_timeout_s)),
        _rule("timeout client-fin", _ms(s.fin_timeout_s)),
        _rule("timeout server-fin", _ms(s.fin_timeout_s)),
        _rule("timeout http-request", _ms(s.http_request_timeout_s)),
        _rule("timeout http-keep-alive", _ms(s.keep_alive_timeout_s)),
        _rule("timeout queue", _ms(s.connect_timeout_s)),
        _rule("timeout tarpit", _ms(s.refusal_delay_s)),
        _rule("http-error status 503 content-type application/json hdr Retry-After 1",
              "string", _word(UNAVAILABLE_BODY)),
    ]


def _frontend(s: HaproxySettings) -> list[str]:
    admin = s.admin_path.rstrip("/")
    admin_id_field = admin.count("/") + 3  # "/admin/libraries/<id>": "", admin, libraries, id
    to_slot = f"crc32,mod({SLOT_COUNT})"
    lib_slot = ",".join([
        "var(txn.vt_payload)", f'regsub("{_arg(LIB_CLAIM)}","\\1")',
        *_passes(JSON_KEY_PASSES), to_slot,
    ])
    admin_slot = ",".join([
        f"path,field({admin_id_field},/),url_dec", *_passes(URL_KEY_PASSES), to_slot,
    ])
    set_slot = "http-request set-var(txn.vt_slot)"
    return [
        "frontend verdant",
        _rule("bind", f"{s.bind_host}:{s.bind_port}"),
        *_prefix_acls("vt_sync", s.sync_path),
        _rule("acl vt_admin path_beg", f"{admin}/libraries/"),
        _rule("acl vt_ws req.hdr(upgrade) -i websocket"),
        _rule("acl vt_bearer_protocol req.hdr(sec-websocket-protocol,1) -m str Bearer"),
        _rule("# the token where the server reads it: the websocket subprotocol, else ?token=;"),
        _rule("# Authorization for plain HTTP"),
        _rule("http-request set-var(txn.vt_token) req.hdr(sec-websocket-protocol,2)",
              "if vt_sync vt_ws vt_bearer_protocol"),
        _rule("http-request set-var(txn.vt_token) url_param(token),url_dec",
              "if vt_sync vt_ws !{ var(txn.vt_token) -m found }"),
        _rule("http-request set-var(txn.vt_token) http_auth_bearer if vt_sync !vt_ws"),
        _rule("# its payload as written; from it the lib claim's routing key, and its slot"),
        _rule("http-request set-var(txn.vt_payload) var(txn.vt_token),field(2,.),ub64dec",
              "if { var(txn.vt_token) -m found }"),
        _rule(set_slot, _word(lib_slot),
              "if { var(txn.vt_payload) -m reg", _word(HAS_LIB_CLAIM), "}"),
        _rule("# file downloads: the slot in the URL, or a safe library name as its own key"),
        _rule(set_slot, "path,field(3,/)",
              "if { path_reg ^/files/[0-9]{1,4}/[^/]+/[^/]+/[^/]+$ }"),
        _rule(set_slot, f"path,field(3,/),{to_slot}",
              "if { path_reg ^/files/[A-Za-z0-9][A-Za-z0-9._-]*/[^/]+/[^/]+$ }"),
        _rule("# the admin API: the percent-encoded library id in the path"),
        _rule(set_slot, _word(admin_slot), "if vt_admin"),
        _rule("http-request set-var(txn.vt_node)",
              f"var(txn.vt_slot),map_int({s.placement_path})",
              "if { var(txn.vt_slot) -m found }"),
        _rule("http-request return status 503 content-type application/json",
              "string", _word(UNAVAILABLE_BODY),
              "if { var(txn.vt_slot) -m found } !{ var(txn.vt_node) -m found }"),
        _rule("http-after-response set-header", SLOT_HEADER, "%[var(txn.vt_slot)]",
              "if { var(txn.vt_slot) -m found }"),
        _rule("use_backend", f"{NODE_BACKEND_PREFIX}%[var(txn.vt_node)]",
              "if { var(txn.vt_node) -m found }"),
        _rule("default_backend", ANY_BACKEND),
    ]


def _server(node: NodeAddress, s: HaproxySettings) -> str:
    return _rule(
        "server", node.name, node.address,
        f"check inter {_ms(s.check_interval_s)} fall {s.check_fall} rise {s.check_rise}",
        "on-marked-down shutdown-sessions",
    )


def _health_check() -> list[str]:
    return [
        _rule("option httpchk"),
        _rule("http-check send meth GET uri /readyz"),
        _rule("http-check expect status 200"),
    ]


def _node_backend(node: NodeAddress, s: HaproxySettings) -> list[str]:
    return [
        f"backend {NODE_BACKEND_PREFIX}{node.name}",
        *_health_check(),
        _rule("# the owner is down: hold the request a while, then 503 (clients retry at once)"),
        _rule("http-request tarpit deny_status 503 if { nbsrv() lt 1 }"),
        _rule("http-after-response set-header", NODE_HEADER, node.name),
        _server(node, s),
    ]


def _any_backend(nodes: Sequence[NodeAddress], s: HaproxySettings) -> list[str]:
    return [
        f"backend {ANY_BACKEND}",
        _rule("# requests that name no library: any healthy node answers them"),
        _rule("balance roundrobin"),
        _rule("option redispatch"),
        *_health_check(),
        _rule("http-after-response set-header", NODE_HEADER, "%s"),
        *(_server(node, s) for node in nodes),
    ]


def _stats(s: HaproxySettings) -> list[str]:
    return [
        "frontend stats",
        _rule("bind", f"{s.stats_host}:{s.stats_port}"),
        _rule("stats enable"),
        _rule("stats uri /"),
        _rule("stats refresh 5s"),
        _rule("stats show-legends"),
    ]


def _passes(passes: Sequence[tuple[str, str]]) -> list[str]:
    return [f'regsub("{_arg(regex)}","{_arg(substitute)}",g)' for regex, substitute in passes]


def _arg(regex: str) -> str:
    """A regex as a double-quoted converter argument: `\\` and `"` are escaped at that level."""
    return regex.replace("\\", "\\\\").replace('"', '\\"')


def _word(expression: str) -> str:
    """One configuration word, single-quoted so that the file's parser leaves it alone."""
    if "'" in expression:
        raise ValueError("a sample expression with a single quote cannot be single-quoted")
    return f"'{expression}'"


def map_entries(placement: Placement) -> list[tuple[str, str]]:
    """The map as HAProxy holds it: (`first:last` or `slot`, node), one per range of the table."""
    return [(run.key, run.node) for run in placement.ranges()]


def replace_map_commands(map_path: Path, version: int, placement: Placement) -> list[str]:
    """Runtime API commands that switch HAProxy's map to `placement` in one step.

    Send `prepare map <map_path>` first: it answers the new (empty) map version, `version` here.
    These commands fill that version and commit it, which swaps the whole map atomically: a
    request sees the old table or the new one, never a mix, and no connection is touched.
    """
    lines = [f"add map @{version} {map_path} {key} {node}" for key, node in map_entries(placement)]
    return [*lines, f"commit map @{version} {map_path}"]
