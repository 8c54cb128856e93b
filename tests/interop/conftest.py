"""Fixtures for interop tests (real @verdant-web/store clients in Node).

Missing prerequisites make every interop test FAIL (not skip) with a clear
message, so that an unprepared machine can never report them as passing.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    NodeClient,
    ServerProcess,
    check_node_setup,
    free_port,
    server_command,
    start_server,
)

INTEROP_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEROP_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.interop)


@pytest.fixture(autouse=True)
def _interop_prerequisites() -> None:
    problem = check_node_setup()
    if problem:
        pytest.fail(f"interop prerequisites missing: {problem}", pytrace=False)


@pytest.fixture
def interop_log_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Per-test directory for server/client logs.

    Under ``$VERDANT_INTEROP_LOG_DIR/<test>`` if set (e.g. to keep them as CI
    artifacts), else inside the test's tmp_path.
    """
    base = os.environ.get("VERDANT_INTEROP_LOG_DIR")
    if base:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-150:]
        path = Path(base) / safe
    else:
        path = tmp_path / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def library_id() -> str:
    """A fresh library id per test (isolates tests sharing a server)."""
    return f"lib-{secrets.token_hex(4)}"


@pytest.fixture
async def verdant_server(tmp_path: Path, interop_log_dir: Path) -> AsyncIterator[ServerProcess]:
    """The server under test, in its own temp working directory.

    Default: our server (``python -m verdant_trio.service.cli quickstart``); set
    ``VERDANT_INTEROP_SERVER_CMD`` (with a ``{port}`` placeholder) to use
    another one.
    """
    port = free_port()
    workdir = tmp_path / "server"
    server = await start_server(server_command(port), cwd=workdir, port=port)
    try:
        yield server
    finally:
        await server.terminate()
        # keep the server log next to the client logs
        try:
            (interop_log_dir / "server.log").write_bytes(server.log_path.read_bytes())
        except OSError:
            pass


ClientFactory = Callable[..., Awaitable[NodeClient]]


@pytest.fixture
async def make_client(
    verdant_server: ServerProcess, interop_log_dir: Path, library_id: str
) -> AsyncIterator[ClientFactory]:
    """Factory for Node clients connected to ``verdant_server``.

    ``await make_client("alice", user="alice", transport="pull", ...)``;
    other keyword arguments go to ``NodeClient.open``. ``library`` defaults to
    this test's ``library_id``; ``user`` defaults to the client name.
    All clients are closed (or killed) at teardown.
    """
    clients: list[NodeClient] = []

    async def make(
        name: str = "client",
        *,
        user: str | None = None,
        library: str | None = None,
        token_type: int | str | None = None,
        **kwargs: Any,
    ) -> NodeClient:
        if "auth_endpoint" not in kwargs and "token" not in kwargs:
            kwargs["auth_endpoint"] = verdant_server.auth_url(
                library or library_id, user or name, type=token_type
            )
        client = await NodeClient.open(name=name, log_dir=interop_log_dir, **kwargs)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.aclose()
