"""systemd's readiness protocol (sd_notify(3)) on a Trio datagram socket, with no dependency.

Under `Type=notify` systemd passes `$NOTIFY_SOCKET` (a socket path, or `@name` for an abstract
socket) and, with `WatchdogSec=`, `$WATCHDOG_USEC` (and `$WATCHDOG_PID`). We send:
- `READY=1` once the listeners are bound and accepting (so `systemctl start` returns only then,
  and units ordered after us find the port open);
- `RELOADING=1` + `MONOTONIC_USEC` when a SIGHUP reload starts, then `READY=1` when it is done;
- `STOPPING=1` when shutdown begins;
- `WATCHDOG=1` every half watchdog interval while the server is healthy, so a wedged event loop
  or unwritable storage gets the service restarted;
- `STATUS=...`, shown by `systemctl status`.

Outside systemd every call is a no-op. A failed send is logged once and never takes the server
down: losing systemd's attention is better than losing the sync service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

import trio

log = logging.getLogger(__name__)


def parse_notify_address(value: str) -> str | bytes:
    """`@name` is an abstract socket (a leading NUL byte); anything else a filesystem path."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if not value.startswith("/"):
        raise ValueError(f"unsupported NOTIFY_SOCKET address {value!r}")
    return value


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """How often to ping: half of `$WATCHDOG_USEC`, if the watchdog is meant for this process."""
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    target = environ.get("WATCHDOG_PID")
    if target and target.isdigit() and int(target) != pid:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec / 1_000_000 / 2 if usec > 0 else None


class SystemdNotifier:
    """Sends sd_notify messages; create with `from_environment()`."""

    def __init__(
        self, address: str | bytes | None, *, watchdog_interval_s: float | None = None
    ) -> None:
        self.address = address
        self.watchdog_interval_s = watchdog_interval_s if address is not None else None
        self._socket: trio.socket.SocketType | None = None
        self._warned = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> SystemdNotifier:
        environ = os.environ if environ is None else environ
        raw = environ.get("NOTIFY_SOCKET")
        address: str | bytes | None = None
        if raw:
            try:
                address = parse_notify_address(raw)
            except ValueError as exc:
                log.warning("not notifying systemd error=%s", exc)
        return cls(address, watchdog_interval_s=watchdog_interval_s(environ, pid or os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    async def notify(self, *fields: str) -> bool:
        """Send one message of `KEY=value` lines; False if not under systemd or it failed."""
        if self.address is None:
            return False
        data = "\n".join(fields).encode()
        try:
            if self._socket is None:
                self._socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            await self._socket.sendto(data, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd error=%r", exc)
            return False
        return True

    async def ready(self, status: str | None = None) -> bool:
        return await self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    async def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return await self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    async def stopping(self, status: str | None = None) -> bool:
        return await self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    async def status(self, text: str) -> bool:
        return await self.notify(f"STATUS={text}")

    async def watchdog(self) -> bool:
        return await self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def run_watchdog(self, healthy: Callable[[], Awaitable[bool]]) -> None:
        """Ping at half the watchdog interval while `healthy()`; skip pings while it is not.

        A skipped ping is deliberate: systemd then restarts the service after `WatchdogSec`.
        Runs until cancelled; returns at once if no watchdog is configured.
        """
        interval = self.watchdog_interval_s
        if interval is None:
            return
        log.info("systemd watchdog enabled interval_s=%.3f", interval)
        was_healthy = True
        while True:
            ok = False  # a health check slower than the interval counts as unhealthy
            with trio.move_on_after(interval):
                ok = await healthy()
            if not ok:
                if was_healthy:
                    log.error("unhealthy: withholding the systemd watchdog ping")
            else:
                await self.watchdog()
                if not was_healthy:
                    log.info("healthy again: systemd watchdog pings resumed")
            was_healthy = ok
            await trio.sleep(interval)
