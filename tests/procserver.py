"""Our server as a separate process (`verdant-trio serve --config`): for tests that must measure
its memory, or kill it with SIGKILL and start it again on the same data.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import trio

from verdant_trio.sync.protocol import ReplicaType
from verdant_trio.sync.tokens import TokenProvider

SECRET = "procserver-secret-0123456789abcdef012"
ADMIN = "procserver-admin-token-0123456789abc"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class ServerProcess:
    """A server on a fixed port and data directory; `start()` again after a kill."""

    data_dir: Path
    limits: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: trio.Process | None = None
    popen: subprocess.Popen[bytes] | None = None
    """Set instead of `process` when started from synchronous code (`start_blocking`)."""
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sync_url(self) -> str:
        return self.url + "/verdant"

    @property
    def databases_dir(self) -> Path:
        return self.data_dir / "dbs"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def pid(self) -> int:
        if self.popen is not None:
            return self.popen.pid
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "verdant_trio.service.cli", "serve", "--config", str(self.write_config())]

    def token(self, library: str, user: str, type: ReplicaType = ReplicaType.REALTIME) -> str:
        return TokenProvider(SECRET).get_token(library, user, self.sync_url, type=type)

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def write_config(self) -> Path:
        def section(name: str, values: dict[str, Any]) -> list[str]:
            return [f"[{name}]", *(f"{k} = {orjson.dumps(v).decode()}" for k, v in values.items())]

        path = self.data_dir / "verdant-trio.toml"
        lines = [
            *section("server", {"port": self.port, "host": "127.0.0.1"}),
            *section("auth", {"token_secret": SECRET, "admin_token": ADMIN}),
            *section("storage", {"databases_dir": str(self.databases_dir), **self.storage}),
            *section("files", {"root": str(self.data_dir / "files")}),
            *section("limits", {"shutdown_timeout_s": 5, **self.limits}),
            *section("logging", {"level": "info"}),
        ]
        path.write_text("\n".join(lines) + "\n")
        return path

    async def start(self, nursery: trio.Nursery, timeout_s: float = 30.0) -> None:
        """Start the process and return once it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = self.command()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.process = await nursery.start(partial(
                trio.run_process, command, cwd=REPO, stdout=log, stderr=log, check=False,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            ))
        finally:
            log.close()
        self.starts += 1
        with trio.fail_after(timeout_s):
            while True:
                if self.process.returncode is not None:
                    raise AssertionError(f"server exited early:\n{self.log()[-3000:]}")
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                return

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no checkpoint, nothing flushed by the server."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await self.process.wait()
            if self.process.returncode is None:
                await self.kill()

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    # -- from synchronous code (module fixtures) ------------------------------------------------

    def start_blocking(self, timeout_s: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.command(), cwd=REPO, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop_blocking()
        raise AssertionError(f"server not listening after {timeout_s} s")

    def stop_blocking(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@contextlib.asynccontextmanager
async def server_process(data_dir: Path, **kwargs: Any) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(data_dir, **kwargs)
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        try:
            yield server
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()
