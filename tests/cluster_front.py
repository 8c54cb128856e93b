"""The real HAProxy in front of stub nodes, for the cluster routing tests.

- `haproxy_binary()`: Debian's `haproxy`, or a failure naming the install command (never a skip).
- `run_haproxy(...)`: a checked configuration, the process in the caller's nursery, and the
  runtime API (`Front.runtime`) to wait on server states and change the map while it runs.
- `StubNode`: a small HTTP/1.1 server (h11) that answers what a real node decides about routing:
  its own name, and the library and owner it reads from the request (the token it verifies, or
  the URL), so a test can check that HAProxy brought each request to the owner.
- `HttpClient`: keep-alive HTTP/1.1 over one connection (h11), fast enough for tens of thousands
  of requests in a test.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import h11
import orjson
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage
from wsproto.utilities import generate_accept_token

from verdant_trio.service.cluster.placement import Placement
from verdant_trio.storage.names import decode_name
from verdant_trio.sync.errors import VerdantError
from verdant_trio.sync.tokens import TokenVerifier
from verdant_trio.transport.app import bearer_token, socket_token

INSTALL_HAPROXY = "command -v haproxy || (apt-get update && apt-get install -y haproxy)"


def haproxy_binary() -> str:
    found = shutil.which("haproxy")
    assert found, (
        "haproxy (Debian's package, 2.6) is not on PATH and the cluster tests need it; "
        f"install it with: {INSTALL_HAPROXY}"
    )
    return found


def short_tempdir() -> Path:
    """A directory for unix sockets: pytest's tmp_path can exceed the 108-byte path limit."""
    return Path(tempfile.mkdtemp(prefix="vt-front-"))


@dataclass
class Front:
    """A running HAProxy: its public port and its runtime API."""

    port: int
    runtime_socket: Path
    process: trio.Process
    log_path: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def runtime(self, command: str) -> str:
        """One runtime API command (non-interactive: HAProxy answers and closes)."""
        with trio.fail_after(10):
            stream = await trio.open_unix_socket(str(self.runtime_socket))
            async with stream:
                await stream.send_all(command.encode() + b"\n")
                chunks = []
                while chunk := await stream.receive_some(65536):
                    chunks.append(chunk)
        return b"".join(chunks).decode()

    async def stat_rows(self) -> list[dict[str, str]]:
        """`show stat`: one row per frontend, backend and server, by column name."""
        text = await self.runtime("show stat")
        header, *rows = [line for line in text.splitlines() if line]
        columns = header.lstrip("# ").split(",")
        return [dict(zip(columns, row.split(","), strict=False)) for row in rows]

    async def server_states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> status ("UP", "DOWN", "UP 1/2", ...)."""
        return {
            (row["pxname"], row["svname"]): row["status"]
            for row in await self.stat_rows()
            if row.get("svname") not in ("FRONTEND", "BACKEND")
        }

    async def wait_for_states(
        self, want: Callable[[dict[tuple[str, str], str]], bool], timeout_s: float = 20
    ) -> None:
        with trio.fail_after(timeout_s):
            while not want(await self.server_states()):
                await trio.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.asynccontextmanager
async def run_haproxy(
    config: str, directory: Path, port: int, runtime_socket: Path
) -> AsyncIterator[Front]:
    """Check `config`, run HAProxy with it until the block ends, and wait until it accepts."""
    binary = haproxy_binary()
    path = directory / "haproxy.cfg"
    path.write_text(config)
    check = await trio.run_process(
        [binary, "-c", "-f", str(path)], capture_stdout=True, capture_stderr=True, check=False
    )
    assert check.returncode == 0, (
        f"haproxy -c refused the generated configuration:\n{check.stderr.decode()}\n{config}"
    )
    log_path = directory / "haproxy.log"
    async with trio.open_nursery() as nursery:
        with open(log_path, "ab") as log:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process, [binary, "-db", "-f", str(path)],
                    stdout=log, stderr=log, check=False,
                )
            )
        front = Front(port, runtime_socket, process, log_path)
        with trio.fail_after(20):
            while True:
                if process.returncode is not None:
                    raise AssertionError(f"haproxy exited early:\n{front.log()[-3000:]}")
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                if runtime_socket.exists():
                    break
                await trio.sleep(0.05)
        try:
            yield front
        finally:
            nursery.cancel_scope.cancel()  # run_process: SIGTERM, then SIGKILL after 5 s


# -- the stub nodes --------------------------------------------------------------------------


@dataclass
class StubNode:
    """Answers as node `name`: `{"node", "lib", "owner", "slot"}` for every request.

    The library is read as a node reads it: from the verified token (the websocket subprotocol
    or `?token=` for an upgrade, else `Authorization`), or from the URL of a file download or
    an admin request. `accept_websockets` completes upgrades (101, then the same answer in a
    text frame); otherwise an upgrade is answered like any request, as a refusing node would.
    """

    name: str
    placement: Placement
    verifier: TokenVerifier
    admin_prefix: str = "/admin"
    accept_websockets: bool = False
    port: int = 0
    requests: int = 0
    _scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    partial(trio.serve_tcp, self._serve, self.port or 0, host="127.0.0.1")
                )
                self.port = listeners[0].socket.getsockname()[1]
                task_status.started()

    def stop(self) -> None:
        """Stop listening and drop every connection, as a killed node would."""
        self._scope.cancel()

    def answer(self, target: str, headers: dict[str, str]) -> dict[str, Any]:
        url = urlsplit(target)
        lib: str | None = None
        slot: int | None = None
        parts = url.path.split("/")
        try:
            if url.path == "/readyz":
                return {"node": self.name, "ready": True}
            if url.path.startswith(self.admin_prefix + "/libraries/"):
                lib = unquote(parts[self.admin_prefix.count("/") + 2])
            elif url.path.startswith("/files/") and len(parts) == 6 and parts[2].isdigit():
                slot, lib = int(parts[2]), decode_name(unquote(parts[3]))
            elif url.path.startswith("/files/") and len(parts) == 5:
                lib = decode_name(unquote(parts[2]))
            elif headers.get("upgrade", "").lower() == "websocket":
                protocols = headers.get("sec-websocket-protocol", "").split(",")
                lib = self.verifier.verify(
                    socket_token(protocols if protocols != [""] else [], url.query.encode())
                ).library_id
            elif "authorization" in headers:
                lib = self.verifier.verify(bearer_token(headers["authorization"])).library_id
        except VerdantError as exc:
            return {"node": self.name, "error": int(exc.code)}
        owner = self.placement.owner_of(lib) if lib is not None else None
        return {"node": self.name, "lib": lib, "owner": owner, "slot": slot}

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    headers = {k.decode().lower(): v.decode() for k, v in request.headers}
                    self.requests += 1
                    body = orjson.dumps(self.answer(request.target.decode(), headers))
                    upgrade = headers.get("upgrade", "").lower() == "websocket"
                    if upgrade and self.accept_websockets:
                        await self._accept_websocket(stream, conn, headers, body)
                        return
                    await stream.send_all(
                        conn.send(h11.Response(status_code=200, headers=[
                            ("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))),
                        ]))
                        + conn.send(h11.Data(data=body))
                        + conn.send(h11.EndOfMessage())
                    )
                    request = None
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return  # (PAUSED: the client sent more after a request we have not answered)
                if conn.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
                    conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    async def _accept_websocket(
        self, stream: trio.SocketStream, conn: h11.Connection, headers: dict[str, str],
        body: bytes,
    ) -> None:
        reply = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", generate_accept_token(headers["sec-websocket-key"].encode())),
        ]
        offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
        if "Bearer" in offered:
            reply.append(("Sec-WebSocket-Protocol", "Bearer"))
        response = conn.send(h11.InformationalResponse(status_code=101, headers=reply))
        frames = Connection(ConnectionType.SERVER)
        await stream.send_all(
            response
            + frames.send(TextMessage(data=body.decode()))
            + frames.send(CloseConnection(code=1000))
        )


@contextlib.asynccontextmanager
async def stub_nodes(
    names: Sequence[str], placement: Placement, verifier: TokenVerifier, **options: Any
) -> AsyncIterator[dict[str, StubNode]]:
    async with trio.open_nursery() as nursery:
        nodes = {name: StubNode(name, placement, verifier, **options) for name in names}
        for node in nodes.values():
            await nursery.start(node.run)
        try:
            yield nodes
        finally:
            nursery.cancel_scope.cancel()


# -- the client ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class HttpClient:
    """Sequential keep-alive requests on one connection, reopened when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._stream: trio.SocketStream | None = None
        self._conn = h11.Connection(h11.CLIENT)

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> Reply:
        if self._stream is None or self._conn.our_state is not h11.IDLE:
            await self.aclose()
            self._stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            self._conn = h11.Connection(h11.CLIENT)
        conn, stream = self._conn, self._stream
        all_headers = [("Host", f"127.0.0.1:{self.port}"), *headers]
        if body or method == "POST":
            all_headers.append(("Content-Length", str(len(body))))
        await stream.send_all(
            conn.send(h11.Request(method=method, target=target, headers=all_headers))
            + (conn.send(h11.Data(data=body)) if body else b"")
            + conn.send(h11.EndOfMessage())
        )
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError(f"the front closed the connection before answering {target}")
        assert response is not None
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        headers_out = {k.decode().lower(): v.decode() for k, v in response.headers}
        return Reply(response.status_code, headers_out, b"".join(chunks))



async def pipelined(
    port: int,
    requests: Sequence[tuple[str, str, Sequence[tuple[str, str]], bytes]],
    connections: int = 8,
) -> list[Reply]:
    """Every request through `port`, pipelined on `connections` keep-alive connections.

    One task per connection writes its requests while another reads the replies in order.
    Requests are formatted and replies read here rather than with h11, whose ~135 µs a
    request (measured) made the client the slowest part of the bulk test; the replies are
    HAProxy's and must carry `Content-Length` (anything else fails the test).
    """
    host = f"127.0.0.1:{port}"
    replies: list[Reply | None] = [None] * len(requests)

    def wire(index: int) -> bytes:
        method, target, headers, body = requests[index]
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def writer(stream: trio.SocketStream, indices: range) -> None:
        pending = bytearray()
        for index in indices:
            pending += wire(index)
            if len(pending) >= 65536:
                await stream.send_all(pending)
                pending.clear()
        if pending:
            await stream.send_all(pending)

    async def one_connection(indices: range) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(writer, stream, indices)
            buffer = bytearray()
            for index in indices:
                while (end := buffer.find(b"\r\n\r\n")) < 0:
                    buffer += await _receive(stream, requests[index][1])
                status_line, *header_lines = buffer[:end].decode("latin-1").split("\r\n")
                headers = {}
                for line in header_lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                assert "content-length" in headers, (status_line, headers)
                length = int(headers["content-length"])
                while len(buffer) < end + 4 + length:
                    buffer += await _receive(stream, requests[index][1])
                body = bytes(buffer[end + 4 : end + 4 + length])
                del buffer[: end + 4 + length]
                replies[index] = Reply(int(status_line.split(" ")[1]), headers, body)

    async with trio.open_nursery() as nursery:
        for first in range(connections):
            nursery.start_soon(one_connection, range(first, len(requests), connections))
    assert all(reply is not None for reply in replies)
    return [reply for reply in replies if reply is not None]


async def _receive(stream: trio.SocketStream, target: str) -> bytes:
    data = await stream.receive_some(262144)
    if not data:
        raise AssertionError(f"the front closed a connection before answering {target}")
    return data


def answering_nodes_config(ports: dict[str, int], runtime_socket: Path) -> str:
    """An HAProxy playing the nodes for the bulk routing test: each port answers its name.

    Fast enough for tens of thousands of requests; what the node behind HAProxy would decide
    from the token is checked separately (the test verifies every token it sends).
    """
    lines = [
        "global",
        f"    stats socket {runtime_socket} mode 600 level admin",
        "defaults",
        "    mode http",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout connect 5s",
    ]
    for name, port in ports.items():
        answer = f"string '{{\"node\":\"{name}\"}}'"
        lines += [
            f"frontend stub_{name}",
            f"    bind 127.0.0.1:{port}",
            f"    http-request return status 200 content-type application/json {answer}",
        ]
    return "\n".join(lines) + "\n"
