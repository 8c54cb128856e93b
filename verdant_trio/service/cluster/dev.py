"""`verdant-trio cluster-dev`: a whole cluster on loopback, the quickstart of cluster mode.

N `verdant-trio serve --quickstart` nodes (each with its own TOML: quickstart settings and a
`[cluster]` section) and Debian's HAProxy in front with the generated configuration. Through the
front it serves what `verdant-server` serves: the dev `/auth/{libraryId}` token route (tokens
name the front, so clients reconnect through it), `/verdant`, files and the open admin API.

Nursery tree: `run_dev_cluster` owns one task per child process. Cancelling it (Ctrl-C,
SIGTERM) stops every child: SIGTERM, then SIGKILL if it has not exited after
`KILL_AFTER_S` (a node closes its libraries within `NODE_SHUTDOWN_S` plus the daemon's own
margin). A node that dies on its own is reported with the command that restarts it, and the
others keep serving (that is what the tests of a node down do); HAProxy dying stops everything.

Everything lives in the data directory: the placement table (kept across runs, so every
library stays on the node that holds its data), the nodes' configurations, databases and
logs, HAProxy's configuration and log, and `cluster.json`, which describes the running cluster
for tools and tests.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from .haproxy import HaproxySettings, NodeAddress, render_config
from .placement import Placement, generate
from .runtime import RuntimeApiError, server_states
from .tablefile import read_placement, write_placement

log = logging.getLogger(__name__)

NODE_SHUTDOWN_S: Final = 5.0
"""Each node's `[limits] shutdown_timeout_s`."""
KILL_AFTER_S: Final = NODE_SHUTDOWN_S + 10.0
"""SIGTERM, then SIGKILL after this (the daemon cancels requests at shutdown + 5 s)."""
START_TIMEOUT_S: Final = 60.0
MAX_NODES: Final = 32
STOPPED_BY_SIGNAL: Final = frozenset({0, -signal.SIGINT, -signal.SIGTERM})
"""Exit statuses of a child stopped as asked (a node exits 0; HAProxy dies of the signal)."""
INSTALL_HAPROXY: Final = "apt-get install haproxy"


class DevClusterError(Exception):
    """The cluster cannot start; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class DevNode:
    name: str
    port: int
    internal_port: int
    directory: Path
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "node.log"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "verdant_trio.service.cli", "serve", "--quickstart",
            "--config", str(self.config_path),
        ]


@dataclass(slots=True)
class DevCluster:
    """A planned (configured) local cluster; `pids` fill in once it runs."""

    data_dir: Path
    front_port: int
    stats_port: int
    placement_path: Path
    placement: Placement
    haproxy_config_path: Path
    runtime_socket: Path
    nodes: list[DevNode]
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def front_url(self) -> str:
        return f"http://127.0.0.1:{self.front_port}"

    def describe(self) -> dict[str, Any]:
        """What `cluster.json` says: enough for a tool or a test to find every part."""
        return {
            "front": self.front_url,
            "stats": f"http://127.0.0.1:{self.stats_port}/",
            "runtime_socket": str(self.runtime_socket),
            "placement": str(self.placement_path),
            "haproxy_config": str(self.haproxy_config_path),
            "haproxy_pid": self.pids.get("haproxy"),
            "nodes": {
                node.name: {
                    "url": node.url,
                    "internal_port": node.internal_port,
                    "config": str(node.config_path),
                    "directory": str(node.directory),
                    "databases": str(node.directory / "verdant-dbs"),
                    "log": str(node.log_path),
                    "command": node.command(),
                    "pid": self.pids.get(node.name),
                }
                for node in self.nodes
            },
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml(value: Any) -> str:
    """A TOML value: JSON's string escapes are a subset of TOML's basic strings."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def plan_dev_cluster(
    data_dir: Path, count: int, *, port: int, secret: str, stats_port: int | None = None
) -> DevCluster:
    """Write the table (unless one is there), the nodes' and HAProxy's configurations."""
    if not 1 <= count <= MAX_NODES:
        raise DevClusterError(f"--nodes must be 1-{MAX_NODES}, got {count}")
    names = [f"n{i}" for i in range(1, count + 1)]
    data_dir = data_dir.absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    placement_path = data_dir / "placement.map"
    if placement_path.exists():
        placement = read_placement(placement_path)
        if sorted(placement.nodes) != sorted(names):
            raise DevClusterError(
                f"{placement_path} places libraries on {', '.join(placement.nodes)}, not on "
                f"{count} nodes {', '.join(names)}: pass --nodes {len(placement.nodes)}, or "
                "another --data-dir"
            )
    else:
        placement = generate(names)
        write_placement(placement_path, placement)
    front_url = f"http://127.0.0.1:{port}"
    cluster_secret = secrets.token_urlsafe(32)
    nodes = [
        DevNode(name, free_port(), free_port(), data_dir / name, data_dir / name / "node.toml")
        for name in names
    ]
    for node in nodes:
        node.directory.mkdir(exist_ok=True)
        peers = {other.name: f"http://127.0.0.1:{other.internal_port}" for other in nodes
                 if other is not node}
        sections: dict[str, dict[str, Any]] = {
            "server": {"host": "127.0.0.1", "port": node.port, "public_url": front_url},
            "auth": {"token_secret": secret},
            "storage": {"databases_dir": str(node.directory / "verdant-dbs")},
            "files": {"root": str(node.directory / "verdant-files")},
            "limits": {"shutdown_timeout_s": NODE_SHUTDOWN_S},
            "cluster": {
                "node_id": node.name, "placement_file": str(placement_path),
                "secret": cluster_secret, "internal_host": "127.0.0.1",
                "internal_port": node.internal_port, "peers": peers,
            },
        }
        text = "# Written by `verdant-trio cluster-dev` at each start: edits are lost.\n"
        for section, keys in sections.items():
            text += f"\n[{section}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
        _write_private(node.config_path, text)
    runtime_socket = Path(tempfile.mkdtemp(prefix="verdant-cluster-")) / "haproxy.sock"
    stats = stats_port or free_port()
    config = render_config(
        placement,
        [NodeAddress(node.name, "127.0.0.1", node.port) for node in nodes],
        HaproxySettings(
            placement_path=placement_path, bind_port=port, stats_port=stats,
            runtime_socket=runtime_socket, check_interval_s=0.5, check_fall=2, check_rise=1,
        ),
    )
    haproxy_config_path = data_dir / "haproxy.cfg"
    haproxy_config_path.write_text(config)
    return DevCluster(
        data_dir, port, stats, placement_path, placement, haproxy_config_path, runtime_socket,
        nodes,
    )


def _write_private(path: Path, text: str) -> None:
    """A file only its owner reads (it holds the dev cluster's secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        raise DevClusterError(f"haproxy is not installed; install it ({INSTALL_HAPROXY})")
    return found


async def _stop_gently(name: str, process: trio.Process) -> None:
    """How a child is stopped: SIGTERM, then SIGKILL after `KILL_AFTER_S`."""
    process.terminate()
    with trio.move_on_after(KILL_AFTER_S):
        await process.wait()
        return
    log.warning("%s did not stop within %.0f s: killing it", name, KILL_AFTER_S)
    process.kill()


async def _run_child(
    name: str,
    command: list[str],
    log_path: Path,
    on_exit: Callable[[int], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as output:  # noqa: ASYNC230 - the child writes to it, not us
        process: trio.Process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=env,
        )
    try:
        task_status.started(process)
        code = await process.wait()
    finally:
        if process.returncode is None:
            with trio.CancelScope(shield=True):
                await _stop_gently(name, process)
    await on_exit(code)


async def run_dev_cluster(
    cluster: DevCluster, *, task_status: trio.TaskStatus[DevCluster] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the nodes and HAProxy until cancelled; started once the front serves every node."""
    binary = haproxy_binary()
    check = await trio.run_process(
        [binary, "-c", "-q", "-f", str(cluster.haproxy_config_path)],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    if check.returncode != 0:
        raise DevClusterError(f"haproxy refused {cluster.haproxy_config_path}:\n{check.stderr.decode()}")
    try:
        await _run(cluster, binary, task_status)
    finally:
        shutil.rmtree(cluster.runtime_socket.parent, ignore_errors=True)


async def _run(cluster: DevCluster, binary: str, task_status: trio.TaskStatus[DevCluster]) -> None:
    haproxy_gone = trio.Event()
    async with trio.open_nursery() as nursery:
        for node in cluster.nodes:

            async def node_exited(code: int, node: DevNode = node) -> None:
                cluster.pids.pop(node.name, None)
                how = "stopped" if code in STOPPED_BY_SIGNAL else f"exited with status {code}"
                log.warning(
                    "node %s %s; the others keep serving. Restart it: %s",
                    node.name, how, " ".join(node.command()),
                )

            process = await nursery.start(
                partial(_run_child, node.name, node.command(), node.log_path, node_exited)
            )
            cluster.pids[node.name] = process.pid

        with trio.fail_after(START_TIMEOUT_S):
            for node in cluster.nodes:
                await _wait_ready(node)

        async def haproxy_exited(code: int) -> None:
            if code in STOPPED_BY_SIGNAL:  # Ctrl-C reaches the whole process group
                log.info("haproxy stopped: stopping the cluster")
            else:
                haproxy_gone.set()
                log.error("haproxy exited with status %d: stopping the cluster", code)
            nursery.cancel_scope.cancel()

        process = await nursery.start(partial(
            _run_child, "haproxy", [binary, "-db", "-f", str(cluster.haproxy_config_path)],
            cluster.data_dir / "haproxy.log", haproxy_exited,
        ))
        cluster.pids["haproxy"] = process.pid
        with trio.fail_after(START_TIMEOUT_S):
            await _wait_front(cluster, haproxy_gone)
        batch_scheduling(process.pid)
        (cluster.data_dir / "cluster.json").write_text(json.dumps(cluster.describe(), indent=2))
        task_status.started(cluster)
    if haproxy_gone.is_set():
        raise DevClusterError(f"haproxy stopped; see {cluster.data_dir / 'haproxy.log'}")


def batch_scheduling(pid: int) -> None:
    """Put every thread of HAProxy under `SCHED_BATCH`, as `systemd/haproxy.service.d` does in
    production, where it shares cores with the nodes.

    Under the default policy each packet from a client wakes HAProxy and it preempts the node
    at once, to forward that one message; under `SCHED_BATCH` it waits for the node to pause
    (it does between batches, a few ms at most) and forwards what came meanwhile in one read
    and one write. Measured with the `libraries` benchmark: HAProxy's CPU per operation fell
    from 14 % of the node's to 11 %, and the writers' latency did not grow. Called once HAProxy
    serves, when all its threads exist. Best effort: a kernel that refuses only costs speed.
    """
    try:
        tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:
            log.warning("haproxy thread %d keeps its scheduling policy: %s", tid, exc)


async def _wait_ready(node: DevNode) -> None:
    async with httpx.AsyncClient(base_url=node.url, timeout=2) as http:
        while True:
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.05)


async def _wait_front(cluster: DevCluster, haproxy_gone: trio.Event) -> None:
    """Until HAProxy's health checks have every node up."""
    wanted = {(f"node_{node.name}", node.name) for node in cluster.nodes}
    while not haproxy_gone.is_set():
        try:
            states = await server_states(cluster.runtime_socket)
        except RuntimeApiError:
            states = {}
        if all(states.get(key, "").startswith("UP") for key in wanted):
            return
        await trio.sleep(0.05)
    raise DevClusterError(f"haproxy stopped; see {cluster.data_dir / 'haproxy.log'}")


BANNER: Final = """\
🌿 Verdant (verdant-trio) development cluster: {count} nodes behind HAProxy at {front}

  Never use this in production. It ignores authentication: anyone can get a token for any
  library from /auth/<libraryId>, and the admin API at /admin is open.

Connect clients as to verdant-server, through the front:
  sync.authEndpoint = "{front}/auth/<libraryId>?userId=<userId>"

{nodes}
HAProxy stats {stats}, runtime API {socket}, log {haproxy_log}
Data: {data} (placement table {placement}; cluster.json describes it all).
Ctrl-C stops everything.
"""


def banner(cluster: DevCluster) -> str:
    counts = cluster.placement.counts()
    nodes = "\n".join(
        f"  {node.name:<4} {node.url:<24} {counts.get(node.name, 0):>4} slots   log {node.log_path}"
        for node in cluster.nodes
    )
    described = cluster.describe()
    return BANNER.format(
        count=len(cluster.nodes), front=cluster.front_url, nodes=nodes,
        stats=described["stats"], socket=cluster.runtime_socket,
        haproxy_log=cluster.data_dir / "haproxy.log", data=cluster.data_dir,
        placement=cluster.placement_path,
    )
