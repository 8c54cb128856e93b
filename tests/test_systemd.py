"""sd_notify on a Trio datagram socket, and the unit file."""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from verdant_trio.service.notify import (
    SystemdNotifier,
    parse_notify_address,
    watchdog_interval_s,
)

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "verdant-trio.service"
TEMPLATE = UNIT.with_name("verdant-trio@.service")


async def receive(sock: trio.socket.SocketType) -> str:
    with trio.fail_after(5):
        return (await sock.recv(4096)).decode()


async def test_notifications_reach_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(str(path))
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(path)}, pid=1)
        assert notifier.enabled and notifier.watchdog_interval_s is None
        assert await notifier.ready("listening on x")
        assert await receive(sock) == "READY=1\nSTATUS=listening on x"
        assert await notifier.reloading()
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", await receive(sock))
        assert await notifier.stopping()
        assert await receive(sock) == "STOPPING=1"
        notifier.close()


async def test_notifications_reach_an_abstract_socket() -> None:
    name = f"verdant-test-{secrets.token_hex(6)}"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(b"\0" + name.encode())
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@" + name}, pid=1)
        assert await notifier.watchdog()
        assert await receive(sock) == "WATCHDOG=1"
        notifier.close()


async def test_outside_systemd_nothing_is_sent_and_failures_do_not_raise(tmp_path: Path) -> None:
    assert not await SystemdNotifier.from_environment({}, pid=1).ready()
    gone = SystemdNotifier(str(tmp_path / "nobody-listens"))
    assert not await gone.ready()  # logged once, never raised
    gone.close()
    assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1"}, pid=1).address is None


def test_watchdog_interval_is_half_and_only_for_us() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, pid=7) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=7) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, pid=7) is None
    assert watchdog_interval_s({}, pid=7) is None
    assert parse_notify_address("@x") == b"\0x"
    with pytest.raises(ValueError):
        parse_notify_address("relative")


async def test_watchdog_pings_only_while_healthy(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    path = tmp_path / "notify"
    healthy = [True, True, False, False, True]
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(str(path))
        notifier = SystemdNotifier(str(path), watchdog_interval_s=1.0)

        async def check() -> bool:
            return healthy.pop(0) if healthy else True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.run_watchdog, check)
            await trio.sleep(4.5)  # five checks, at 0, 1, 2, 3 and 4 s (virtual time)
            nursery.cancel_scope.cancel()
        pings = 0
        while True:
            with trio.move_on_after(0.1) as quiet:
                await sock.recv(4096)
            if quiet.cancelled_caught:
                break
            pings += 1
        assert pings == 3
        notifier.close()


def unit_directives(unit: Path = UNIT) -> dict[str, list[str]]:
    """The unit as systemd reads it: `[Section] Key=value`, repeated keys kept in order."""
    directives: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        directives.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return directives


def test_the_unit_has_what_the_service_needs() -> None:
    d = unit_directives()
    one = {k: v[-1] for k, v in d.items()}
    assert one["Service.Type"] == "notify"
    assert "verdant-trio serve --config /etc/verdant-trio/verdant-trio.toml" in one["Service.ExecStart"]
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Service.DynamicUser"] == "yes"
    assert one["Service.StateDirectory"] == "verdant-trio"
    assert one["Service.WorkingDirectory"] == "%S/verdant-trio"
    assert d["Service.LoadCredential"] == [
        "token-secret:/etc/verdant-trio/token-secret",
        "admin-token:/etc/verdant-trio/admin-token",
    ]
    assert one["Service.RestartPreventExitStatus"] == "78"  # EX_CONFIG: no restart loop
    assert one["Service.WatchdogSec"]
    for hardening, expected in {
        "ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
        "ProtectHome": "yes", "PrivateDevices": "yes", "RestrictNamespaces": "yes",
        "CapabilityBoundingSet": "", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():  # fmt: skip
        assert one[f"Service.{hardening}"] == expected, hardening
    assert one["Install.WantedBy"] == "multi-user.target"
    # the secrets the unit hands over are the ones the example configuration names
    example = (UNIT.parents[1] / "config.example.toml").read_text()
    assert '"${CREDENTIALS_DIRECTORY}/token-secret"' in example
    assert '"${CREDENTIALS_DIRECTORY}/admin-token"' in example


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` also checks that ExecStart exists: point it at this checkout's
    entry point, everything else unchanged."""
    entry = Path(sys.executable).parent / "verdant-trio"
    if not entry.exists():  # not installed as a script: any executable stands in
        entry = Path(sys.executable)
    unit = tmp_path / "verdant-trio.service"
    unit.write_text(UNIT.read_text().replace("/opt/verdant-trio/bin/verdant-trio", str(entry)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Unknown" not in result.stderr and "Unknown" not in result.stdout, result.stderr


def test_the_cluster_template_runs_one_node_per_instance_with_its_own_state() -> None:
    single, template = unit_directives(), unit_directives(TEMPLATE)
    one = {k: v[-1] for k, v in template.items()}
    assert "serve --config /etc/verdant-trio/%i.toml" in one["Service.ExecStart"]
    assert one["Service.StateDirectory"] == "verdant-trio/%i"
    assert one["Service.WorkingDirectory"] == "%S/verdant-trio/%i"
    assert one["Service.User"] == "verdant-trio-%i"  # a dynamic user per node
    assert template["Service.LoadCredential"] == [
        *single["Service.LoadCredential"], "cluster-secret:/etc/verdant-trio/cluster-secret",
    ]
    # everything else (readiness, reload, restart policy, hardening) as the single unit's
    differs = {"Unit.Description", "Service.ExecStart", "Service.StateDirectory",
               "Service.WorkingDirectory", "Service.User", "Service.LoadCredential"}
    assert {k: v for k, v in template.items() if k not in differs} == {
        k: v for k, v in single.items() if k not in differs
    }
    example = (UNIT.parents[1] / "config.example.toml").read_text()
    assert '"${CREDENTIALS_DIRECTORY}/cluster-secret"' in example


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_an_instance_of_the_template(tmp_path: Path) -> None:
    entry = Path(sys.executable).parent / "verdant-trio"
    if not entry.exists():
        entry = Path(sys.executable)
    (tmp_path / TEMPLATE.name).write_text(
        TEMPLATE.read_text().replace("/opt/verdant-trio/bin/verdant-trio", str(entry))
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "verdant-trio@n1.service")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # systemd only warns about a directive it cannot parse ("..., ignoring"): none may be
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr


def test_the_haproxy_drop_in_runs_it_under_batch_scheduling() -> None:
    drop_in = UNIT.parent / "haproxy.service.d" / "verdant-trio.conf"
    assert unit_directives(drop_in) == {"Service.CPUSchedulingPolicy": ["batch"]}
