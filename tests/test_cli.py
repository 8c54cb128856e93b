"""`verdant-trio token` and `verdant-trio admin ...` against a running server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from verdant_trio.client import connect, timestamp
from verdant_trio.service import cli
from verdant_trio.sync.protocol import ReplicaType
from verdant_trio.sync.tokens import TokenVerifier

from .conftest import ADMIN_TOKEN, SECRET, RunningServer


def config_for(server: RunningServer, tmp_path: Path, **auth: str) -> Path:
    path = tmp_path / "verdant-trio.toml"
    secrets = {"token_secret": SECRET, "admin_token": ADMIN_TOKEN, **auth}
    path.write_text(
        f"[server]\nport = {server.settings.port}\npublic_url = \"https://sync.example.com\"\n"
        "[auth]\n" + "".join(f'{k} = "{v}"\n' for k, v in secrets.items())
        + f'[storage]\ndatabases_dir = "{server.settings.core.libraries.databases_dir}"\n'
    )
    return path


async def run(*argv: str) -> int:
    """The CLI is synchronous (it is a client); run it beside the server's event loop."""
    return await trio.to_thread.run_sync(cli.main, list(argv))


def test_token_is_minted_for_the_configured_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "v.toml"
    config.write_text(f'[server]\npublic_url = "https://sync.example.com"\n[auth]\ntoken_secret = "{SECRET}"\n')
    argv = ["token", "--config", str(config), "-l", "lib", "-u", "ann", "--type", "read-only-pull",
            "--expires-in", "5m", "--role", "editor"]  # fmt: skip
    assert cli.main(argv) == 0
    token = capsys.readouterr().out.strip()
    info = TokenVerifier(SECRET).verify(token)
    assert (info.library_id, info.user_id, info.role) == ("lib", "ann", "editor")
    assert info.type is ReplicaType.READ_ONLY_PULL
    assert info.sync_endpoint == "https://sync.example.com/verdant"


def test_token_without_a_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VERDANT_TOKEN_SECRET", raising=False)
    monkeypatch.delenv("VERDANT_CONFIG", raising=False)
    assert cli.main(["token", "-l", "lib", "-u", "ann", "--sync-url", "http://x/verdant"]) == 1
    assert "no token secret" in capsys.readouterr().err
    monkeypatch.setenv("VERDANT_TOKEN_SECRET", SECRET)
    assert cli.main(["token", "-l", "lib", "-u", "ann", "--sync-url", "http://x/verdant", "-t", "2"]) == 0
    info = TokenVerifier(SECRET).verify(capsys.readouterr().out.strip())
    assert info.type is ReplicaType.PASSIVE_REALTIME and info.sync_endpoint == "http://x/verdant"
    with pytest.raises(SystemExit) as usage:
        cli.main(["token", "-l", "lib", "-u", "ann", "--type", "superuser"])
    assert usage.value.code == 2


async def test_admin_commands_against_a_running_daemon(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(config_for(server, tmp_path))
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token(user="alice")) as a, connect(
            server.sync_url, server.token(user="bob")
        ) as b:
            stamp = timestamp()
            op = {"oid": "items/1", "timestamp": stamp, "data": {"op": "initialize", "value": {"content": "hi"}}}
            await a.sync("ra", operations=[op])
            await b.sync("rb")
        capsys.readouterr()

        def output() -> Any:
            return orjson.loads(capsys.readouterr().out)

        assert await run("admin", "--config", config, "info", "lib") == 0
        info = output()
        assert info["latestServerOrder"] == 1
        assert {r["id"]: r["truant"] for r in info["replicas"]} == {"ra": False, "rb": False}

        assert await run("admin", "--config", config, "snapshot", "lib", "items", "1") == 0
        assert output() == {"content": "hi"}

        assert await run("admin", "--config", config, "force-truant", "lib", "ra") == 0
        assert output() == {"success": True}
        assert await run("admin", "--config", config, "info", "lib") == 0
        assert {r["id"]: r["truant"] for r in output()["replicas"]} == {"ra": True, "rb": False}

        assert await run("admin", "--config", config, "evict-user", "lib", "bob") == 0
        assert output() == {"success": True, "replicasRemoved": 1}

        # eviction is destructive: no --yes and no terminal to ask on means no
        assert await run("admin", "--config", config, "evict", "lib") == 1
        assert "pass --yes" in capsys.readouterr().err
        assert await run("admin", "--config", config, "evict", "lib", "--yes") == 0
        assert output() == {"success": True}
        assert await run("admin", "--config", config, "snapshot", "lib", "items", "1") == 1
        assert "error: HTTP 404: document items/1 not found" in capsys.readouterr().err


async def test_admin_errors_are_clear(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = str(config_for(server, tmp_path, admin_token="a-wrong-admin-token-0123"))
    assert await run("admin", "--config", config, "info", "lib") == 1
    assert "error: HTTP 401: invalid admin token" in capsys.readouterr().err
    assert await run("admin", "--config", config, "--url", "http://127.0.0.1:1", "info", "x") == 1
    assert "error: cannot reach the daemon at http://127.0.0.1:1" in capsys.readouterr().err
    monkeypatch.setenv("VERDANT_ADMIN_TOKEN", ADMIN_TOKEN)  # the environment wins
    assert await run("admin", "--config", config, "info", "nope") == 1
    assert "error: HTTP 404: library 'nope' not found" in capsys.readouterr().err
