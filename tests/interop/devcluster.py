"""`verdant-trio cluster-dev` as a test fixture: 3 nodes and the real HAProxy on loopback.

`dev_cluster(directory)` starts the command as a user would, waits for its `cluster.json`
(written once HAProxy's checks have every node up), and at the end stops it with SIGTERM and
checks that it exits 0 with every child gone. `run_pool` runs many real clients in one Node
process (`node/pool.mjs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from verdant_trio.service.cluster.placement import Placement
from verdant_trio.service.cluster.runtime import RuntimeApiError, server_states
from verdant_trio.service.cluster.tablefile import read_placement
from verdant_trio.storage.names import encode_id

from .harness import NODE_DIR, REGISTER_HOOK, REPO_ROOT, free_port, node_binary

SECRET = "cluster-dev-interop-secret-0123456789"


@dataclass
class DevCluster:
    process: trio.Process
    data_dir: Path
    info: dict[str, Any]
    placement: Placement
    log_path: Path
    restarted: list[trio.Process] = field(default_factory=list)
    """Nodes a test started again itself (after killing them); stopped at the end."""

    @property
    def front(self) -> str:
        return str(self.info["front"])

    @property
    def names(self) -> list[str]:
        return list(self.info["nodes"])

    def node(self, name: str) -> dict[str, Any]:
        node: dict[str, Any] = self.info["nodes"][name]
        return node

    def owner(self, library: str) -> str:
        return self.placement.owner_of(library)

    def auth(self, library: str, user: str, base: str | None = None) -> str:
        return str(httpx.URL(f"{base or self.front}/auth/{library}", params={"userId": user}))

    def shards(self, name: str) -> set[str]:
        """The library shards in a node's databases directory (by file name)."""
        databases = Path(self.node(name)["databases"])
        if not databases.exists():
            return set()
        return {p.name for p in databases.iterdir() if p.name.endswith(".sqlite")}

    @staticmethod
    def shard_name(library: str) -> str:
        return f"{encode_id(library, 'library id')}.sqlite"

    def library_on(self, name: str, prefix: str = "lib") -> str:
        return next(f"{prefix}-{i}" for i in range(100_000) if self.owner(f"{prefix}-{i}") == name)

    async def states(self) -> dict[tuple[str, str], str]:
        try:
            return await server_states(self.info["runtime_socket"])
        except RuntimeApiError:
            return {}

    async def wait_for_state(self, name: str, prefix: str, timeout_s: float = 20) -> None:
        """Until HAProxy's check says node `name` is `prefix` ("UP", "DOWN")."""
        with trio.fail_after(timeout_s):
            while not (await self.states()).get((f"node_{name}", name), "").startswith(prefix):
                await trio.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def dev_cluster(directory: Path, nodes: int = 3) -> AsyncIterator[DevCluster]:
    data_dir = directory / "cluster"
    log_path = directory / "cluster-dev.log"
    command = [
        sys.executable, "-m", "verdant_trio.service.cli", "cluster-dev", "--nodes", str(nodes),
        "--port", str(free_port()), "--secret", SECRET, "--data-dir", str(data_dir),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    with open(log_path, "wb") as log:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
        )
    cluster: DevCluster | None = None
    try:
        with trio.fail_after(90):
            while not (data_dir / "cluster.json").exists():
                assert process.returncode is None, log_path.read_text()
                await trio.sleep(0.05)
        info = json.loads((data_dir / "cluster.json").read_text())
        cluster = DevCluster(process, data_dir, info, read_placement(info["placement"]), log_path)
        yield cluster
    finally:
        with trio.CancelScope(shield=True):
            if cluster is not None:
                for node in cluster.restarted:
                    if node.returncode is None:
                        node.terminate()
                    with trio.move_on_after(20):
                        await node.wait()
            if process.returncode is None:
                process.terminate()
            with trio.move_on_after(30):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 0, f"cluster-dev exited {process.returncode}\n{log_path.read_text()}"
    pids = [n["pid"] for n in cluster.info["nodes"].values()] + [cluster.info["haproxy_pid"]]
    alive = [pid for pid in pids if _alive(pid)]
    assert not alive, f"children still running after cluster-dev stopped: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone too: it only waits for its parent (gone) to be reaped
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"
    return False


async def run_pool(
    clients: Sequence[dict[str, str]],
    expected: dict[str, list[str]],
    log_path: Path,
    timeout_s: float = 90,
) -> dict[str, Any]:
    """Real clients in one Node process (`node/pool.mjs`): each puts an item, then the pool
    waits until every client lists the items of `expected[its library]` (client names, of
    every pool). Returns what the clients listed."""
    scenario = json.dumps(
        {"clients": list(clients), "expected": expected, "timeoutMs": int(timeout_s * 1000)}
    )
    with open(log_path, "ab") as log, trio.fail_after(timeout_s + 30):
        result = await trio.run_process(
            [node_binary(), "--import", REGISTER_HOOK.as_uri(), str(NODE_DIR / "pool.mjs")],
            cwd=NODE_DIR, stdin=scenario.encode(), capture_stdout=True, stderr=log, check=False,
        )
    assert result.returncode == 0, log_path.read_text()[-3000:]
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer
