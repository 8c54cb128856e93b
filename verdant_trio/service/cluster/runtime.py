"""HAProxy's runtime API (its `stats socket`): one command per connection, over a unix socket.

Used to wait for the nodes' health checks (`show stat`) and to swap the placement map while
HAProxy runs (`HaproxyFront`, with `haproxy.replace_map_commands`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Final

import trio

from .haproxy import NODE_BACKEND_PREFIX, map_entries, replace_map_commands
from .placement import Placement
from .tablefile import write_placement

log = logging.getLogger(__name__)

RUNTIME_TIMEOUT_S: Final = 10.0
COMMANDS_PER_REQUEST: Final = 64
"""`add map` lines sent in one request: HAProxy reads a request line into one buffer (16 KB)."""
_MAP_LINE: Final = re.compile(r"\s*-?\d+ \((?P<file>[^)]+)\) ")


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


def loaded_maps(text: str) -> list[str]:
    """The files of the maps HAProxy loaded, from `show map`."""
    return [m.group("file") for line in text.splitlines() if (m := _MAP_LINE.match(line))]


class HaproxyFront:
    """HAProxy as `cluster move` sees it: it must reach the target, and switches its map.

    `map_path` is the placement map as HAProxy loaded it (None: the only map it has). After a
    switch, the table is also written to that file when this process may (HAProxy rereads it at
    a restart or reload); when it may not, a warning says to copy it there.
    """

    def __init__(self, socket_path: str | os.PathLike[str], map_path: str | None = None) -> None:
        self.socket_path = socket_path
        self.map_path = map_path

    async def _map(self) -> str:
        if self.map_path is None:
            maps = loaded_maps(await runtime_command(self.socket_path, "show map"))
            if len(maps) != 1:
                raise RuntimeApiError(
                    f"HAProxy has {len(maps)} maps ({', '.join(maps) or 'none'}): name the "
                    "placement map (--haproxy-map)"
                )
            self.map_path = maps[0]
        return self.map_path

    async def check_target(self, node: str) -> None:
        states = await server_states(self.socket_path)
        state = states.get((f"{NODE_BACKEND_PREFIX}{node}", node))
        if state is None:
            raise RuntimeApiError(
                f"HAProxy has no backend for {node}: regenerate its configuration with every "
                "node (`verdant-trio cluster haproxy-config --nodes ...`) and reload it first"
            )
        if not state.startswith("UP"):
            raise RuntimeApiError(f"HAProxy's health check has {node} {state}, not UP")

    async def routes_by(self, table: Placement) -> bool:
        """Whether HAProxy's map holds exactly `table` now."""
        map_path = await self._map()
        shown = await runtime_command(self.socket_path, f"show map {map_path}")
        entries = [tuple(line.split()[1:3]) for line in shown.splitlines() if line.strip()]
        return entries == map_entries(table)

    async def switch(self, table: Placement) -> None:
        map_path = await self._map()
        prepared = await runtime_command(self.socket_path, f"prepare map {map_path}")
        match = re.match(r"New version created: (\d+)", prepared.strip())
        if not match:
            raise RuntimeApiError(f"HAProxy refused prepare map: {prepared.strip()[:200]!r}")
        commands = replace_map_commands(Path(map_path), int(match.group(1)), table)
        for start in range(0, len(commands), COMMANDS_PER_REQUEST):
            answer = await runtime_command(
                self.socket_path, "; ".join(commands[start : start + COMMANDS_PER_REQUEST])
            )
            if answer.strip():  # add and commit answer nothing when they work
                raise RuntimeApiError(f"HAProxy refused the new map: {answer.strip()[:200]!r}")
        if not await self.routes_by(table):
            raise RuntimeApiError("HAProxy's map does not show the new table after the commit")
        try:
            await trio.to_thread.run_sync(write_placement, map_path, table)
        except OSError as exc:
            log.warning(
                "HAProxy routes by table version %d, but its map file %s could not be written "
                "(%s): copy the table there, or a reload of HAProxy goes back to the old one",
                table.version, map_path, exc,
            )
