"""Interop test harness: a sync server process + real Verdant clients in Node.

Server side
    ``free_port()``, ``start_server(cmd, cwd=..., port=...)`` -> ``ServerProcess``
    ``server_command(port)`` picks the command: ``$VERDANT_INTEROP_SERVER_CMD``
    (shell-style string, ``{port}`` placeholder) or, by default, our own server
    (``python -m verdant_trio.service.cli quickstart --port N``).

Client side
    ``NodeClient.open(...)`` spawns ``node --import register.mjs driver.mjs``
    (one real ``@verdant-web/store`` client per process) and talks JSON lines
    to it; see ``node/driver.mjs`` for the command set.

Everything is trio; nothing here sleeps for fixed amounts of time except
polling intervals inside ``wait_until``.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import trio

INTEROP_DIR = Path(__file__).resolve().parent
NODE_DIR = INTEROP_DIR / "node"
DRIVER = NODE_DIR / "driver.mjs"
REGISTER_HOOK = NODE_DIR / "register.mjs"
REPO_ROOT = INTEROP_DIR.parent.parent

INSTALL_HINT = "npm ci --prefix tests/interop/node"

#: Environment knobs (all optional).
ENV_SERVER_CMD = "VERDANT_INTEROP_SERVER_CMD"  # e.g. "node /tmp/ref/serve.mjs --port {port}"
ENV_AUTH_URL = "VERDANT_INTEROP_AUTH_URL"  # template: {base} {library} {user} {type}
ENV_HOST = "VERDANT_INTEROP_HOST"  # host the server is reached at (default 127.0.0.1)
ENV_NODE = "VERDANT_INTEROP_NODE"  # node binary (default: "node" on PATH)

T = TypeVar("T")
Doc = dict[str, Any]
Docs = list[dict[str, Any]]


class HarnessError(RuntimeError):
    """Base class for harness failures (server or client)."""


class ServerStartError(HarnessError):
    pass


class DriverError(HarnessError):
    """The driver answered a command with ok=false."""

    def __init__(self, message: str, *, cmd: str, stack: str | None = None) -> None:
        super().__init__(message)
        self.cmd = cmd
        self.stack = stack


class DriverDied(HarnessError):
    """The Node process exited / closed stdout unexpectedly."""


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return "<no log>"
    try:
        data = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "<log file missing>"
    return "\n".join(data[-lines:]) if data else "<log empty>"


# ---------------------------------------------------------------------------
# Server


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_host() -> str:
    return os.environ.get(ENV_HOST, "127.0.0.1")


def default_server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "verdant_trio.service.cli", "quickstart", "--port", str(port)]


def server_command(port: int, override: str | None = None) -> list[str]:
    """The command that starts the server under test on ``port``.

    ``override`` (or ``$VERDANT_INTEROP_SERVER_CMD``) is a shell-style string
    where ``{port}`` is replaced by the port number.
    """
    raw = override if override is not None else os.environ.get(ENV_SERVER_CMD)
    if raw:
        return shlex.split(raw.replace("{port}", str(port)))
    return default_server_command(port)


def is_default_server() -> bool:
    return not os.environ.get(ENV_SERVER_CMD)


class ServerProcess:
    """A running server process; stdout+stderr go to ``log_path``."""

    def __init__(
        self,
        process: trio.Process,
        *,
        cmd: Sequence[str],
        port: int,
        cwd: Path,
        log_path: Path,
        host: str,
        log_file: Any,
        env: Mapping[str, str] | None = None,
        ready_path: str | None = "/",
    ) -> None:
        self.process = process
        self._env = dict(env) if env else None
        self._ready_path = ready_path
        self.cmd = list(cmd)
        self.port = port
        self.cwd = cwd
        self.log_path = log_path
        self.host = host
        self._log_file = log_file

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def sync_url(self) -> str:
        return f"{self.base_url}/verdant"

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def auth_url(self, library_id: str, user_id: str, *, type: int | str | None = None) -> str:
        """Dev token route: ``GET /auth/{libraryId}?userId=...&type=...``.

        Overridable with ``$VERDANT_INTEROP_AUTH_URL`` (a template with
        ``{base}``, ``{library}``, ``{user}``, ``{type}``).
        """
        template = os.environ.get(ENV_AUTH_URL)
        if template:
            return template.format(
                base=self.base_url,
                library=library_id,
                user=user_id,
                type="" if type is None else type,
            )
        params: dict[str, str] = {"userId": user_id}
        if type is not None:
            params["type"] = str(type)
        return str(httpx.URL(f"{self.base_url}/auth/{library_id}", params=params))

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    async def wait(self) -> int:
        rc = await self.process.wait()
        self._close_log()
        return rc

    async def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(timeout):
                return await self.wait()
            self.process.kill()
        return await self.wait()

    async def kill(self) -> int:
        """SIGKILL (simulates a crash)."""
        if self.process.returncode is None:
            self.process.kill()
        return await self.wait()

    async def restart(self, *, timeout: float = 30.0) -> ServerProcess:
        """Stop this process (SIGTERM, if still running) and start the same
        command again on the same port and working directory (same storage).
        Returns the new ServerProcess; the server log is appended to."""
        await self.terminate()
        return await start_server(
            self.cmd,
            cwd=self.cwd,
            port=self.port,
            env=self._env,
            ready_path=self._ready_path,
            timeout=timeout,
            host=self.host,
            log_name=self.log_path.name,
        )

    def _close_log(self) -> None:
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.close()

    async def __aenter__(self) -> ServerProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.terminate()


async def _port_accepts(host: str, port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def start_server(
    cmd: Sequence[str],
    *,
    cwd: Path | str,
    port: int,
    env: Mapping[str, str] | None = None,
    ready_path: str | None = "/",
    timeout: float = 30.0,
    host: str | None = None,
    log_name: str = "server.log",
) -> ServerProcess:
    """Spawn a server and wait until ``port`` accepts TCP connections.

    If ``ready_path`` is set, additionally wait until an HTTP GET to it gets
    any response (any status code counts). Raises ``ServerStartError`` with
    the log tail if the process exits or the timeout passes.
    """
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    host = host or server_host()
    log_path = cwd / log_name
    full_env = dict(os.environ)
    # our server must be importable even if the package is not installed
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    log_file = open(log_path, "ab", buffering=0)  # noqa: SIM115 - owned by ServerProcess
    try:
        process = await trio.lowlevel.open_process(
            list(cmd),
            cwd=str(cwd),
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    except OSError as e:
        log_file.close()
        raise ServerStartError(f"could not spawn server {cmd!r}: {e}") from e
    server = ServerProcess(
        process,
        cmd=cmd,
        port=port,
        cwd=cwd,
        log_path=log_path,
        host=host,
        log_file=log_file,
        env=env,
        ready_path=ready_path,
    )

    async def _wait_ready() -> None:
        while True:
            if process.poll() is not None:
                raise ServerStartError(
                    f"server exited with code {process.returncode} before accepting "
                    f"connections on {host}:{port}\ncmd: {shlex.join(cmd)}\n"
                    f"--- {log_path} (tail) ---\n{server.log_tail()}"
                )
            if await _port_accepts(host, port):
                break
            await trio.sleep(0.05)
        if ready_path is None:
            return
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                if process.poll() is not None:
                    raise ServerStartError(
                        f"server exited with code {process.returncode} during readiness "
                        f"check\n--- {log_path} (tail) ---\n{server.log_tail()}"
                    )
                try:
                    await http.get(f"{server.base_url}{ready_path}")
                    return
                except httpx.HTTPError:
                    await trio.sleep(0.05)

    try:
        with trio.fail_after(timeout):
            await _wait_ready()
    except trio.TooSlowError:
        await server.kill()
        raise ServerStartError(
            f"server did not accept connections on {host}:{port} within {timeout}s\n"
            f"cmd: {shlex.join(cmd)}\n--- {log_path} (tail) ---\n{server.log_tail()}"
        ) from None
    except BaseException:
        with trio.CancelScope(shield=True):
            await server.kill()
        raise
    return server


# ---------------------------------------------------------------------------
# Node client


def node_binary() -> str:
    return os.environ.get(ENV_NODE, "node")


def check_node_setup() -> str | None:
    """None if node + the driver's node_modules are present, else a message."""
    import shutil

    node = node_binary()
    if shutil.which(node) is None:
        return f"`{node}` (Node.js >= 20) not found on PATH; the interop tests need it."
    store = NODE_DIR / "node_modules" / "@verdant-web" / "store" / "package.json"
    if not store.exists():
        return (
            f"{NODE_DIR / 'node_modules'} is missing or incomplete; "
            f"run `{INSTALL_HINT}` from the repository root."
        )
    return None


class _LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def readline(self) -> bytes | None:
        while True:
            idx = self._buf.find(b"\n")
            if idx >= 0:
                line = bytes(self._buf[:idx])
                del self._buf[: idx + 1]
                return line
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                if self._buf:
                    line = bytes(self._buf)
                    self._buf.clear()
                    return line
                return None
            self._buf.extend(chunk)


class NodeClient:
    """One real Verdant client (``@verdant-web/store``) in a Node process.

    Create with ``await NodeClient.open(...)``; use as ``async with`` to close
    it on exit. Commands are serialized (the driver runs them in order).
    """

    DEFAULT_TIMEOUT = 20.0

    def __init__(
        self,
        process: trio.Process,
        *,
        name: str,
        log_path: Path,
        log_file: Any,
        config: dict[str, Any],
    ) -> None:
        self.process = process
        self.name = name
        self.log_path = log_path
        self.config = config
        self._log_file = log_file
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin
        self._reader = _LineReader(process.stdout)
        self._lock = trio.Lock()
        self._next_id = 1
        self._dead = False
        self.init_status: dict[str, Any] | None = None

    # -- lifecycle ---------------------------------------------------------
    @classmethod
    async def open(
        cls,
        *,
        name: str = "client",
        log_dir: Path | str,
        auth_endpoint: str | None = None,
        token: str | None = None,
        namespace: str | None = None,
        transport: str = "realtime",
        automatic_transport_selection: bool | str = False,
        pull_interval: int = 300,
        initial_presence: Any = None,
        default_profile: Any = None,
        auto_start: bool = True,
        schema_version: int = 1,
        capture_wire: bool = False,
        sync: bool = True,
        wait_for_sync: bool = True,
        read_mode: str = "fresh",
        extra_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> NodeClient:
        problem = check_node_setup()
        if problem:
            raise HarnessError(problem)
        config: dict[str, Any] = {
            "transport": transport,
            "automaticTransportSelection": automatic_transport_selection,
            "pullInterval": pull_interval,
            "initialPresence": initial_presence if initial_presence is not None else {},
            "defaultProfile": default_profile if default_profile is not None else {},
            "autoStart": auto_start,
            "schemaVersion": schema_version,
            "captureWire": capture_wire,
            "sync": sync,
            # Return from open() only after the first sync-resp was processed
            # (when syncing with autoStart). Without this, 3.6.3 in pull mode
            # can silently drop a change made while its first sync is in
            # flight; pass False to exercise startup races deliberately.
            "waitForSync": wait_for_sync,
            "waitForSyncTimeout": int(timeout * 1000 * 0.75),
            # "fresh": get/list re-hydrate documents from the client's local
            # storage; "live": read the in-memory entities (see driver.mjs,
            # evictFromEntityCache, for the 3.6.3 weak-event bug this avoids)
            "readMode": read_mode,
        }
        if auth_endpoint is not None:
            config["authEndpoint"] = auth_endpoint
        if token is not None:
            config["token"] = token
        if namespace is not None:
            config["namespace"] = namespace
        if extra_config:
            config.update(extra_config)

        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"node-{name}.log"
        n = 1
        while log_path.exists():
            n += 1
            log_path = log_dir / f"node-{name}-{n}.log"
        log_file = open(log_path, "ab", buffering=0)  # noqa: SIM115 - owned by NodeClient
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        try:
            process = await trio.lowlevel.open_process(
                [node_binary(), "--import", REGISTER_HOOK.as_uri(), str(DRIVER)],
                cwd=str(NODE_DIR),
                env=full_env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
            )
        except OSError as e:
            log_file.close()
            raise HarnessError(f"could not spawn node: {e}") from e
        client = cls(process, name=name, log_path=log_path, log_file=log_file, config=config)
        try:
            client.init_status = await client.call("init", timeout=timeout, **config)
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.kill()
            raise
        return client

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    @property
    def alive(self) -> bool:
        return not self._dead and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    async def close(self, timeout: float = 10.0) -> int:
        """Clean shutdown via the `close` command; the process must exit 0."""
        await self.call("close", timeout=timeout)
        with trio.fail_after(timeout):
            rc = await self.process.wait()
        self._finish()
        if rc != 0:
            raise DriverDied(f"[{self.name}] exited with {rc} after close\n{self.log_tail()}")
        return rc

    async def aclose(self) -> None:
        """Best-effort close for teardown: close, else SIGKILL."""
        if self.process.poll() is not None:
            self._finish()
            return
        try:
            await self.close(timeout=5.0)
        except (HarnessError, trio.TooSlowError, OSError, trio.BrokenResourceError):
            await self.kill()

    async def kill(self) -> None:
        """SIGKILL the Node process (simulates a crashed device)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self._finish()

    def _finish(self) -> None:
        self._dead = True
        try:
            self._stdin.close()  # type: ignore[attr-defined]
        except Exception:
            pass
        if not self._log_file.closed:
            self._log_file.close()

    # -- protocol ------------------------------------------------------------
    def _fail(self, message: str) -> DriverDied:
        rc = self.process.poll()
        return DriverDied(
            f"[{self.name}] {message} (exit code {rc})\n"
            f"--- {self.log_path} (tail) ---\n{self.log_tail()}"
        )

    async def call(self, cmd: str, *, timeout: float | None = None, **args: Any) -> Any:
        """Send one command and return its result (raises DriverError on ok=false)."""
        timeout = self.DEFAULT_TIMEOUT if timeout is None else timeout
        async with self._lock:
            if self._dead:
                raise self._fail(f"client is closed/killed; cannot run {cmd!r}")
            req_id = self._next_id
            self._next_id += 1
            line = json.dumps({"id": req_id, "cmd": cmd, "args": args}) + "\n"
            try:
                with trio.fail_after(timeout):
                    await self._stdin.send_all(line.encode())
                    while True:
                        raw = await self._reader.readline()
                        if raw is None:
                            self._dead = True
                            with trio.move_on_after(2):
                                await self.process.wait()
                            raise self._fail(f"driver exited while running {cmd!r}")
                        try:
                            msg = json.loads(raw)
                        except json.JSONDecodeError:
                            raise self._fail(f"non-JSON line on stdout: {raw[:200]!r}") from None
                        if msg.get("id") == req_id:
                            break
                        # unsolicited lines (events) are ignored
            except trio.TooSlowError:
                raise HarnessError(
                    f"[{self.name}] command {cmd!r} timed out after {timeout}s "
                    f"(args={_short(args)})\n--- {self.log_path} (tail) ---\n{self.log_tail()}"
                ) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, BrokenPipeError) as e:
                self._dead = True
                raise self._fail(f"lost pipe to driver running {cmd!r}: {e!r}") from e
        if not msg.get("ok"):
            raise DriverError(
                f"[{self.name}] {cmd} failed: {msg.get('error')}", cmd=cmd, stack=msg.get("stack")
            )
        return msg.get("result")

    # -- typed convenience methods ------------------------------------------
    async def ping(self) -> dict[str, Any]:
        return cast(Doc, await self.call("ping"))

    async def put(self, collection: str, doc: Mapping[str, Any], *, undoable: bool = True) -> str:
        result = await self.call("put", collection=collection, doc=dict(doc), undoable=undoable)
        return cast(str, result)

    async def update(
        self,
        collection: str,
        id: str,
        *,
        set: Mapping[str, Any] | None = None,
        push: Mapping[str, Any] | None = None,
        remove_at: Mapping[str, int] | None = None,
        remove: Mapping[str, Any] | None = None,
        delete: Sequence[str] | None = None,
        ops: Sequence[Mapping[str, Any]] | None = None,
        undoable: bool = True,
    ) -> dict[str, Any] | None:
        """Edit a document in one batch. Paths are dotted ("metadata.color",
        "comments.0.content") or lists. ``remove_at={"tags": 0}`` deletes a
        list item by index; ``ops`` takes raw ops (see driver.mjs applyOp)."""
        args: dict[str, Any] = {"collection": collection, "id": id, "undoable": undoable}
        if set:
            args["set"] = dict(set)
        if push:
            args["push"] = dict(push)
        if remove_at:
            args["removeAt"] = dict(remove_at)
        if remove:
            args["remove"] = dict(remove)
        if delete:
            args["delete"] = list(delete)
        if ops:
            args["ops"] = [dict(o) for o in ops]
        return cast("Doc | None", await self.call("update", **args))

    async def delete(self, collection: str, id: str, *, undoable: bool = True) -> None:
        await self.call("delete", collection=collection, id=id, undoable=undoable)

    async def get(
        self, collection: str, id: str, *, live: bool | None = None
    ) -> dict[str, Any] | None:
        """Snapshot of one document, or None. ``live=True`` reads the in-memory
        entity (what an app renders) instead of the client's local storage."""
        args: dict[str, Any] = {"collection": collection, "id": id}
        if live is not None:
            args["live"] = live
        return cast("Doc | None", await self.call("get", **args))

    async def list(self, collection: str, *, live: bool | None = None) -> Docs:
        """All documents of a collection, sorted by primary key."""
        args: dict[str, Any] = {"collection": collection}
        if live is not None:
            args["live"] = live
        return cast(Docs, await self.call("list", **args))

    async def presence_update(self, presence: Mapping[str, Any]) -> dict[str, Any]:
        return cast(Doc, await self.call("presenceUpdate", presence=dict(presence)))

    async def presence(self) -> dict[str, Any]:
        """{self, peers (keyed by userId), peerIds, selfReplicaIds}"""
        return cast(Doc, await self.call("presence"))

    async def sync_start(self) -> dict[str, Any]:
        return cast(Doc, await self.call("syncStart"))

    async def sync_stop(self) -> dict[str, Any]:
        return cast(Doc, await self.call("syncStop"))

    async def reconnect(self) -> dict[str, Any]:
        return cast(Doc, await self.call("reconnect"))

    async def set_mode(self, mode: str) -> dict[str, Any]:
        return cast(Doc, await self.call("setMode", mode=mode))

    async def set_pull_interval(self, interval_ms: int) -> dict[str, Any]:
        return cast(Doc, await self.call("setPullInterval", interval=interval_ms))

    async def sync_once(self) -> dict[str, Any]:
        return cast(Doc, await self.call("syncOnce"))

    async def status(self) -> dict[str, Any]:
        """{isConnected, mode, status, pullInterval, syncing, replicaId,
        ackedLogicalTime, lastSyncedLogicalTime, globalAckTimestamp,
        namespace, schemaVersion, futureSeen, unhandledErrors}"""
        return cast(Doc, await self.call("status"))

    async def wait_for_sync(self, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until the client processes another sync-resp/server-ack
        (its lastSyncedLogicalTime changes)."""
        result = await self.call("waitForSync", timeout=timeout + 5, timeoutMs=int(timeout * 1000))
        return cast(Doc, result)

    async def attach_file(
        self,
        collection: str,
        id: str,
        field: str,
        data: bytes,
        *,
        name: str = "file.bin",
        type: str = "application/octet-stream",
    ) -> dict[str, Any]:
        return cast(Doc, await self.call(
            "attachFile",
            collection=collection,
            id=id,
            field=field,
            name=name,
            type=type,
            base64=base64.b64encode(data).decode(),
        ))

    async def file_info(self, collection: str, id: str, field: str) -> dict[str, Any] | None:
        """{id, url, name, type, loading, failed, remote} or None if unset."""
        result = await self.call("fileInfo", collection=collection, id=id, field=field)
        return cast("Doc | None", result)

    async def file_content(self, collection: str, id: str, field: str) -> bytes | None:
        """Bytes of a file field (from the local blob or fetched from its URL)."""
        res = await self.call("fileContent", collection=collection, id=id, field=field)
        return None if res is None else base64.b64decode(cast(str, res["base64"]))

    async def stats(self) -> dict[str, Any]:
        return cast(Doc, await self.call("stats"))

    async def undo(self) -> bool:
        return cast(bool, await self.call("undo"))

    async def redo(self) -> bool:
        return cast(bool, await self.call("redo"))

    async def wire(self, *, clear: bool = False) -> Docs:
        """Captured sync frames (needs capture_wire=True):
        [{transport: 'ws'|'http', dir: 'out'|'in'|..., data, url?, t}]"""
        return cast(Docs, await self.call("wire", clear=clear))

    async def errors(self) -> Docs:
        """Unhandled errors/rejections seen in the client process."""
        return cast(Docs, await self.call("errors"))

    async def reopen(self, **overrides: Any) -> dict[str, Any]:
        """Close and reopen the client on the same (in-memory) IndexedDB:
        an app restart that keeps local data. Overrides use driver config keys."""
        return cast(Doc, await self.call("reopen", **overrides))

    async def wait_until(
        self,
        predicate: Callable[[], Awaitable[T | None]],
        timeout: float = 15.0,
        *,
        interval: float = 0.05,
        message: str = "",
    ) -> T:
        try:
            return await wait_until(predicate, timeout, interval=interval, message=message)
        except AssertionError as e:
            raise AssertionError(
                f"{e}\n--- [{self.name}] {self.log_path} (tail) ---\n{self.log_tail(20)}"
            ) from None


def _short(obj: Any, limit: int = 300) -> str:
    text = json.dumps(obj, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


async def wait_until(
    predicate: Callable[[], Awaitable[T | None]],
    timeout: float = 15.0,
    *,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Poll ``await predicate()`` until it returns something truthy; return it.

    Exceptions from the predicate count as "not yet" (the last one is reported
    on timeout), except HarnessError subclasses for dead drivers, which are
    raised immediately.
    """
    deadline = time.monotonic() + timeout
    last_value: Any = None
    last_exc: BaseException | None = None
    attempts = 0
    while True:
        attempts += 1
        try:
            value = await predicate()
            last_exc = None
            if value:
                return value
            last_value = value
        except DriverDied:
            raise
        except (DriverError, AssertionError, KeyError, IndexError, TypeError) as e:
            last_exc = e
        if time.monotonic() >= deadline:
            detail = (
                f"last exception: {last_exc!r}"
                if last_exc
                else f"last value: {_short(last_value, 2000)}"
            )
            raise AssertionError(
                f"condition not met within {timeout}s after {attempts} attempts"
                f"{': ' + message if message else ''}; {detail}"
            )
        await trio.sleep(min(interval, max(0.0, deadline - time.monotonic())))


async def converged(
    clients: Sequence[NodeClient], collection: str, timeout: float = 15.0
) -> list[dict[str, Any]]:
    """Wait until every client lists the same documents in ``collection``."""

    last: list[list[dict[str, Any]]] = []

    async def same() -> tuple[list[dict[str, Any]]] | None:
        lists = [await c.list(collection) for c in clients]
        last[:] = lists
        if all(lst == lists[0] for lst in lists[1:]):
            return (lists[0],)  # a 1-tuple is truthy even for an empty list
        return None

    try:
        found = await wait_until(same, timeout, message=f"clients converge on {collection!r}")
    except AssertionError as e:
        # what each client had at the end says which change did not get through
        views = "\n".join(f"[{c.name}] {_short(lst, 3000)}" for c, lst in zip(clients, last, strict=True))
        raise AssertionError(f"{e}\n{views}") from None
    return found[0]


async def gather(*thunks: Callable[[], Awaitable[T]]) -> list[T]:
    """Run async callables concurrently; return their results in order.

    ``alice, bob = await gather(lambda: make_client("alice"), lambda: make_client("bob"))``
    (node startup dominates client creation, so this saves real time).
    """
    results: dict[int, T] = {}

    async def run(i: int, thunk: Callable[[], Awaitable[T]]) -> None:
        results[i] = await thunk()

    async with trio.open_nursery() as nursery:
        for i, thunk in enumerate(thunks):
            nursery.start_soon(run, i, thunk)
    return [results[i] for i in range(len(thunks))]


__all__ = [
    "DriverDied",
    "DriverError",
    "HarnessError",
    "NodeClient",
    "ServerProcess",
    "ServerStartError",
    "check_node_setup",
    "converged",
    "default_server_command",
    "free_port",
    "gather",
    "is_default_server",
    "server_command",
    "start_server",
    "wait_until",
]

