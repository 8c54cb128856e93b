"""Servers under test: started on a pinned core, or reached at a URL; CPU and memory from /proc.

`start_server("ours" | "node" | "cluster-N", ...)` launches a fresh server in a fresh data
directory and pins it with `taskset` to one core (the load generator pins itself to another).
`cluster-N` is `verdant-trio cluster-dev --nodes N`: N nodes and HAProxy, all on that one core,
reached through HAProxy; its CPU is the sum over the nodes and HAProxy, also given per process
(`Target.pids`). A server given by URL is measured only if its pid is given too
(`--server-pid`); otherwise the CPU and memory columns stay empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

NODE_LAUNCHER: Final = Path(
    os.environ.get("VERDANT_REF_LAUNCHER", "/tmp/verdant-ref/run-ref-server.sh")
)
REPO: Final = Path(__file__).resolve().parent.parent
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of a process."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def _thread_files(pid: int, name: str) -> Iterator[tuple[int, bytes]]:
    """(thread id, contents of /proc/PID/task/TID/NAME) for every thread still alive."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}", "rb") as f:
                yield int(tid), f.read()
        except OSError:
            continue


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of the main thread and of all other threads together (both still alive)."""
    out = {"main": 0.0, "other_threads": 0.0}
    for tid, stat in _thread_files(pid, "stat"):
        fields = stat.rsplit(b")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        out["main" if tid == pid else "other_threads"] += seconds
    return out


def context_switches(pid: int) -> dict[str, int]:
    """Voluntary and involuntary context switches of every thread (from /proc status)."""
    total = {"voluntary": 0, "involuntary": 0}
    for _tid, status in _thread_files(pid, "status"):
        for line in status.splitlines():
            if line.startswith(b"voluntary_ctxt_switches"):
                total["voluntary"] += int(line.split()[1])
            elif line.startswith(b"nonvoluntary_ctxt_switches"):
                total["involuntary"] += int(line.split()[1])
    return total


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` 5); False if not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Target:
    """A server the generator drives."""

    name: str
    url: str
    """Base URL, e.g. http://127.0.0.1:3242 (the sync endpoint is `url + sync_path`)."""
    secret: str | None
    pid: int | None = None
    sync_path: str = "/verdant"
    process: subprocess.Popen[bytes] | None = None
    data_dir: Path | None = None
    log_path: Path | None = None
    cpu_core: int | None = None
    notes: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    """A server of several processes (a cluster: its nodes and HAProxy), by name; `pid` is then
    None and CPU and memory are their sums."""

    @property
    def sync_url(self) -> str:
        return self.url.rstrip("/") + self.sync_path

    def cpu(self) -> float | None:
        if self.pids:
            return sum(self.cpu_by_process().values())
        return cpu_seconds(self.pid) if self.pid is not None else None

    def cpu_by_process(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def memory(self) -> dict[str, int]:
        if self.pids:  # summed: the peaks of different processes need not coincide
            total: dict[str, int] = {}
            for pid in self.pids.values():
                for key, value in memory_kb(pid).items():
                    total[key] = total.get(key, 0) + value
            return total
        return memory_kb(self.pid) if self.pid is not None else {}


def stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL if it takes longer than `timeout_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server not listening on {port} after {timeout_s} s")


def _pinned(command: list[str], core: int | None) -> list[str]:
    if core is None:
        return command
    if shutil.which("taskset") is None:
        raise RuntimeError("taskset not found (util-linux); pass --no-pin to run unpinned")
    return ["taskset", "-c", str(core), *command]


PATCH_ENV: Final = "BENCH_SERVER_PATCH"
"""A Python file run inside our server before it starts: try a change (a monkeypatch) and
measure it without editing the package. Experiments only."""


def ours_command(port: int, data_dir: Path, secret: str, log_level: str) -> list[str]:
    args = [
        "quickstart", "--port", str(port), "--data-dir", str(data_dir), "--secret", secret,
        "--log-level", log_level,
    ]
    patch = os.environ.get(PATCH_ENV)
    if patch:
        prelude = (
            "import sys, runpy; runpy.run_path(sys.argv.pop(1)); "
            "from verdant_trio.service.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        return [sys.executable, "-c", prelude, str(Path(patch).resolve()), *args]
    return [sys.executable, "-m", "verdant_trio.service.cli", *args]


def node_command(port: int, data_dir: Path, secret: str) -> list[str]:
    if not NODE_LAUNCHER.exists():
        raise RuntimeError(
            f"the Node reference launcher {NODE_LAUNCHER} does not exist "
            "(set $VERDANT_REF_LAUNCHER to a script taking <port> <workdir> [args])"
        )
    return [str(NODE_LAUNCHER), str(port), str(data_dir), "--secret", secret]


def cluster_nodes(kind: str) -> int | None:
    """N for a `cluster-N` server kind (None: not a cluster)."""
    name, _, count = kind.partition("-")
    return int(count) if name == "cluster" and count.isdigit() and int(count) >= 1 else None


@contextlib.contextmanager
def start_cluster(
    nodes: int,
    *,
    secret: str,
    core: int | None,
    log_level: str = "INFO",
    keep_log: Path | None = None,
) -> Iterator[Target]:
    """`verdant-trio cluster-dev --nodes N` on a free port, every process on `core`."""
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix=f"bench-cluster{nodes}-"))
    command = [
        sys.executable, "-m", "verdant_trio.service.cli", "cluster-dev", "--nodes", str(nodes),
        "--port", str(port), "--secret", secret, "--data-dir", str(data_dir / "cluster"),
        "--log-level", log_level,
    ]
    log_path = data_dir / "cluster-dev.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        _pinned(command, core), cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,  # the children inherit the pinning
    )
    described = data_dir / "cluster" / "cluster.json"
    try:
        deadline = time.monotonic() + 90
        while not described.exists():
            if process.poll() is not None:
                raise RuntimeError(f"cluster-dev exited with {process.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster-dev not ready after 90 s; see {log_path}")
            time.sleep(0.1)
        info = json.loads(described.read_text())
        pids = {name: int(node["pid"]) for name, node in info["nodes"].items()}
        pids["haproxy"] = int(info["haproxy_pid"])
        yield Target(
            f"cluster-{nodes}", info["front"], secret, pid=None, process=process,
            data_dir=data_dir, log_path=log_path, cpu_core=core, pids=pids,
            notes={"nodes": str(nodes), "front": info["front"]},
        )
    finally:
        stop_process(process, 40)
        log_file.close()
        if keep_log is not None:
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            with open(keep_log, "wb") as out:
                for part in [log_path, *sorted((data_dir / "cluster").glob("*/node.log")),
                             data_dir / "cluster" / "haproxy.log"]:
                    if part.exists():
                        out.write(f"==> {part.relative_to(data_dir)} <==\n".encode())
                        out.write(part.read_bytes())
        shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def start_server(
    kind: str,
    *,
    secret: str,
    core: int | None,
    log_level: str = "INFO",
    keep_log: Path | None = None,
) -> Iterator[Target]:
    """A fresh server of `kind` ("ours", "node" or "cluster-N") on a free port, stopped on
    exit."""
    nodes = cluster_nodes(kind)
    if nodes is not None:
        with start_cluster(nodes, secret=secret, core=core, log_level=log_level,
                           keep_log=keep_log) as target:
            yield target
        return
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    if kind == "ours":
        command = ours_command(port, data_dir, secret, log_level)
        cwd: Path | None = REPO
    elif kind == "node":
        command = node_command(port, data_dir, secret)
        cwd = None
    else:
        raise ValueError(f"unknown server kind {kind!r}")
    log_path = data_dir / "server.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        _pinned(command, core), cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_listening(port, process, 30.0)
        yield Target(
            kind, f"http://127.0.0.1:{port}", secret, pid=process.pid, process=process,
            data_dir=data_dir, log_path=log_path, cpu_core=core,
        )
    finally:
        stop_process(process, 20)
        log_file.close()
        if keep_log is not None:
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log_path, keep_log)
        shutil.rmtree(data_dir, ignore_errors=True)


def node_version() -> str | None:
    try:
        return subprocess.run(
            ["node", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
