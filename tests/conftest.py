"""Shared fixtures: an in-process server on a free port, tokens for it, and clients."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from verdant_trio.engine.core import VerdantCore
from verdant_trio.engine.settings import CoreSettings, LibrarySettings
from verdant_trio.service.config import ServerSettings
from verdant_trio.service.daemon import Server
from verdant_trio.sync.protocol import ReplicaType
from verdant_trio.sync.tokens import TokenProvider
from verdant_trio.transport.settings import AppSettings

SECRET = "test-secret-0123456789abcdef0123456789"
ADMIN_TOKEN = "admin-token-for-tests"


@dataclasses.dataclass
class RunningServer:
    url: str
    settings: ServerSettings
    data_dir: Path
    shutdown: trio.Event
    daemon: Server

    @property
    def core(self) -> VerdantCore:
        """The running core, for tests that observe library state no client can see."""
        assert self.daemon.core is not None
        return self.daemon.core

    @property
    def sync_url(self) -> str:
        return self.url + self.settings.app.sync_path

    def token(
        self,
        library: str = "lib",
        user: str = "alice",
        type: ReplicaType = ReplicaType.REALTIME,
        expires_in: str | int = "1h",
        secret: str = SECRET,
    ) -> str:
        return TokenProvider(secret).get_token(
            library, user, self.sync_url, type=type, expires_in=expires_in
        )

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=20)

    async def http_sync(
        self, token: str, messages: list[dict[str, Any]]
    ) -> tuple[int, Any]:
        async with self.http() as http:
            response = await http.post(
                self.settings.app.sync_path,
                json={"messages": messages},
                headers={"Authorization": f"Bearer {token}"},
            )
        return response.status_code, response.json()


def make_settings(data_dir: Path, **overrides: Any) -> ServerSettings:
    library_overrides = overrides.pop("libraries", {})
    core_overrides = overrides.pop("core", {})
    app_overrides = overrides.pop("app", {})
    libraries = LibrarySettings(databases_dir=data_dir / "dbs", **library_overrides)
    return ServerSettings(
        token_secret=SECRET,
        host="127.0.0.1",
        port=0,
        core=CoreSettings(libraries=libraries, **core_overrides),
        app=AppSettings(admin_token=ADMIN_TOKEN, **app_overrides),
        files_dir=data_dir / "files",
        **overrides,
    )


@contextlib.asynccontextmanager
async def running_server(
    data_dir: Path, **overrides: Any
) -> AsyncIterator[RunningServer]:
    settings = make_settings(data_dir, **overrides)
    shutdown = trio.Event()
    daemon = Server(settings)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(daemon.serve, shutdown=shutdown))
        port = int(binds[0].rsplit(":", 1)[1])
        settings = dataclasses.replace(settings, port=port)
        try:
            yield RunningServer(f"http://127.0.0.1:{port}", settings, data_dir, shutdown, daemon)
        finally:
            shutdown.set()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with running_server(tmp_path) as running:
        yield running


@pytest.fixture
def server_factory(tmp_path: Path) -> Callable[..., contextlib.AbstractAsyncContextManager[RunningServer]]:
    return partial(running_server, tmp_path)
