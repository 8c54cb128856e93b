"""The daemon as systemd runs it: a real process, a TOML file, `$NOTIFY_SOCKET`, signals.

The test plays systemd: it binds the datagram socket, starts `verdant-trio serve --config`, and
reads what the daemon tells it, awaiting each message instead of sleeping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import orjson
import pytest
import trio

from verdant_trio.client import Closed, connect, timestamp
from verdant_trio.engine.profiles import DefaultProfiles
from verdant_trio.service import logs
from verdant_trio.service.config import load_config
from verdant_trio.service.daemon import Server
from verdant_trio.service.profiles import CallableProfiles
from verdant_trio.sync.tokens import TokenProvider

from .interop.harness import free_port

SECRET = "daemon-test-secret-0123456789abcdef"
ADMIN = "daemon-test-admin-token-0123456789"


@dataclass
class Daemon:
    process: trio.Process
    port: int
    log_path: Path
    notifications: trio.MemoryReceiveChannel[dict[str, str]]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, library: str, user: str = "alice") -> str:
        return TokenProvider(SECRET).get_token(library, user, self.url + "/verdant")

    def log(self) -> str:
        return self.log_path.read_text()

    async def next_notification(self, *, skip_watchdog: bool = True, timeout_s: float = 15) -> dict[str, str]:
        with trio.fail_after(timeout_s):
            async for message in self.notifications:
                if skip_watchdog and message == {"WATCHDOG": "1"}:
                    continue
                return message
        raise AssertionError(f"notify socket closed\n{self.log()}")


def write_config(path: Path, port: int, **logging: Any) -> None:
    lines = [
        "[server]", f"port = {port}",
        "[auth]", 'token_secret_file = "${CREDENTIALS_DIRECTORY}/token-secret"',
        f'admin_token = "{ADMIN}"',
        "[storage]", f'databases_dir = "{path.parent / "dbs"}"',
        "[files]", f'root = "{path.parent / "files"}"',
        "[limits]", "shutdown_timeout_s = 5",
        "[logging]", *(f"{k} = {orjson.dumps(v).decode()}" for k, v in logging.items()),
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


@contextlib.asynccontextmanager
async def systemd_daemon(tmp_path: Path, *, watchdog_usec: int | None = None) -> AsyncIterator[Daemon]:
    """Start the daemon under a fake systemd; kill it if the test did not stop it."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "token-secret").write_text(SECRET + "\n")
    port = free_port()
    config = tmp_path / "verdant-trio.toml"
    write_config(config, port)
    notify_path = tmp_path / "notify.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "CREDENTIALS_DIRECTORY": str(credentials)}
    env.pop("WATCHDOG_USEC", None)
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    log_path = tmp_path / "daemon.log"
    send, receive = trio.open_memory_channel[dict[str, str]](1000)

    async def read_notifications() -> None:
        async with send:
            while True:
                data = await sock.recv(4096)
                fields = dict(line.split("=", 1) for line in data.decode().splitlines())
                await send.send(fields)

    with sock, open(log_path, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "verdant_trio.service.cli", "serve", "--config", str(config)],
            env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_notifications)
            try:
                yield Daemon(process, port, log_path, receive)
            finally:
                if process.returncode is None:
                    process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
                nursery.cancel_scope.cancel()


def initialize(oid: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"oid": oid, "timestamp": timestamp(), "data": {"op": "initialize", "value": value}}


async def test_ready_after_listening_watchdog_and_a_clean_stop(tmp_path: Path) -> None:
    async with systemd_daemon(tmp_path, watchdog_usec=200_000) as daemon:
        ready = await daemon.next_notification(skip_watchdog=False)  # nothing before READY
        assert ready["READY"] == "1", daemon.log()
        assert ready["STATUS"] == f"listening on http://127.0.0.1:{daemon.port}"
        # READY=1 means the port accepts connections now: one attempt, no retry
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        await stream.aclose()
        # pings at half of WATCHDOG_USEC while healthy
        with trio.fail_after(5):
            pings = 0
            async for message in daemon.notifications:
                pings += message == {"WATCHDOG": "1"}
                if pings == 3:
                    break

        # two libraries get data acknowledged; one client stays connected through the stop
        with trio.fail_after(20):
            async with connect(daemon.url + "/verdant", daemon.token("lib-b")) as b:
                await b.sync("rb", operations=[initialize("items/b", {"v": "b"})])
            async with connect(daemon.url + "/verdant", daemon.token("lib-a")) as a:
                await a.sync("ra")
                await a.op("ra", [initialize("items/a", {"v": "a"})])
                assert (await a.wait_for("server-ack"))["type"] == "server-ack"

                daemon.process.send_signal(signal.SIGTERM)
                stopping = await daemon.next_notification()
                assert stopping["STOPPING"] == "1"
                with pytest.raises(Closed) as closed:
                    while True:  # (a global-ack may still come first)
                        await a.receive(timeout_s=10)
                assert closed.value.code == 1001  # going away
            assert await daemon.process.wait() == 0, daemon.log()

    log = daemon.log()
    for library in ("lib-a", "lib-b"):
        assert f"msg=\"library closed\" library={library}" in log
        shard = tmp_path / "dbs" / f"{library}.sqlite"
        wal = shard.with_name(shard.name + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0, "WAL not checkpointed"
        conn = apsw.Connection(str(shard), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            oids = [row[0] for row in conn.execute('SELECT oid FROM "OperationHistory"')]
        finally:
            conn.close()
        assert oids == [f"items/{library[-1]}"]
    assert log.rstrip().endswith("msg=\"stopped: every library closed\"")
    assert SECRET not in log and ADMIN not in log


async def test_sighup_reloads_logging_without_dropping_connections(tmp_path: Path) -> None:
    async with systemd_daemon(tmp_path) as daemon:
        assert (await daemon.next_notification())["READY"] == "1", daemon.log()
        config = tmp_path / "verdant-trio.toml"
        with trio.fail_after(20):
            async with connect(daemon.url + "/verdant", daemon.token("lib")) as client:
                await client.sync("r1")
                # a reloadable change and one that needs a restart
                write_config(config, daemon.port + 1, format="json", level="debug")
                daemon.process.send_signal(signal.SIGHUP)
                reloading = await daemon.next_notification()
                assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
                assert (await daemon.next_notification())["READY"] == "1"
                await client.send({"type": "heartbeat"})
                assert (await client.wait_for("heartbeat-response"))["type"] == "heartbeat-response"

                # a broken file is refused; the server keeps running as it was
                config.write_text("[server]\nport = 'nope'\n")
                daemon.process.send_signal(signal.SIGHUP)
                assert (await daemon.next_notification())["RELOADING"] == "1"
                assert (await daemon.next_notification())["READY"] == "1"
                await client.op("r1", [initialize("items/1", {})])
                await client.wait_for("server-ack")

            daemon.process.send_signal(signal.SIGINT)
            assert (await daemon.next_notification())["STOPPING"] == "1"
            assert await daemon.process.wait() == 0

    lines = daemon.log().splitlines()
    reloaded = next(i for i, line in enumerate(lines) if "configuration reloaded" in line)
    # from the reload on, lines are JSON, with debug ones among them
    after = [orjson.loads(line) for line in lines[reloaded:]]
    assert after[0]["msg"] == "configuration reloaded"
    warning = next(line for line in after if line["msg"] == "changed settings take effect after a restart")
    assert warning["keys"] == "[server]port"
    failed = [line for line in after if line["msg"] == "reload failed; keeping the running settings"]
    assert failed and '[server] port: expected an integer 1-65535, got "nope"' in failed[0]["problem"]
    assert all(not line.startswith("{") for line in lines[:reloaded])  # logfmt before


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`Server.reload` reconfigures the root logger, as it should in the daemon; undo it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logs._handler = None


async def test_reload_swaps_the_profile_source_and_reports_the_rest(
    tmp_path: Path, restore_logging: None
) -> None:
    path = tmp_path / "verdant-trio.toml"
    base = f'[auth]\ntoken_secret = "{SECRET}"\n[storage]\ndatabases_dir = "{tmp_path}/dbs"\n'
    path.write_text(base)
    before = load_config(path)
    server = Server(before.settings)
    assert isinstance(server.profiles.source, DefaultProfiles)
    assert await server.profiles.get("ann") == {"id": "ann"}
    path.write_text(
        base + '[server]\nhost = "0.0.0.0"\n'
        '[profiles]\ncallable = "json:loads"\ncache_ttl_s = 1\n[logging]\naccess_log = true\n'
    )
    after = load_config(path)
    assert server.reload(after, before) == [("server", "host")]
    assert isinstance(server.profiles.source, CallableProfiles)
    assert server.hooks.access_log
    # the cache was emptied: the new source answers
    assert await server.profiles.get('{"id": "ann", "from": "json"}') == {"id": "ann", "from": "json"}
