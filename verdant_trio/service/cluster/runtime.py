"""HAProxy's runtime API (its `stats socket`): one command per connection, over a unix socket.

Used to wait for the nodes' health checks (`show stat`) and to swap the placement map while
HAProxy runs (`haproxy.replace_map_commands`).
"""

from __future__ import annotations

import os
from typing import Final

import trio

RUNTIME_TIMEOUT_S: Final = 10.0


class RuntimeApiError(Exception):
    """HAProxy's runtime API could not be reached or refused a command."""


async def runtime_command(
    socket_path: str | os.PathLike[str], command: str, *, timeout_s: float = RUNTIME_TIMEOUT_S
) -> str:
    """Send one command (non-interactive: HAProxy answers and closes); its answer."""
    try:
        with trio.fail_after(timeout_s):
            stream = await trio.open_unix_socket(os.fspath(socket_path))
            async with stream:
                await stream.send_all(command.encode() + b"\n")
                chunks = []
                while chunk := await stream.receive_some(65536):
                    chunks.append(chunk)
    except OSError as exc:
        raise RuntimeApiError(f"cannot reach HAProxy at {socket_path}: {exc}") from None
    except trio.TooSlowError:
        raise RuntimeApiError(f"HAProxy at {socket_path} did not answer {command.split()[0]!r}") from None
    return b"".join(chunks).decode(errors="replace")


def parse_stat(text: str) -> list[dict[str, str]]:
    """`show stat` CSV: one row per frontend, backend and server, by column name."""
    lines = [line for line in text.splitlines() if line]
    if not lines or not lines[0].startswith("# "):
        raise RuntimeApiError(f"unexpected answer to show stat: {text[:200]!r}")
    columns = lines[0][2:].split(",")
    return [dict(zip(columns, row.split(","), strict=False)) for row in lines[1:]]


async def server_states(socket_path: str | os.PathLike[str]) -> dict[tuple[str, str], str]:
    """(backend, server) -> status ("UP", "DOWN", "UP 1/2", "MAINT", ...)."""
    rows = parse_stat(await runtime_command(socket_path, "show stat"))
    return {
        (row["pxname"], row["svname"]): row.get("status", "")
        for row in rows
        if row.get("svname") not in ("FRONTEND", "BACKEND")
    }
