"""`/healthz`, `/readyz` and `/metrics`, for load balancers, orchestrators and Prometheus.

- `GET /healthz`: the process is alive and its event loop answers. Never touches storage, so a
  slow disk does not get a healthy process killed by a liveness probe.
- `GET /readyz`: send traffic here? The core runs and is not shutting down, the listeners are
  up, and every storage directory accepts a small fsynced write (checked in a worker thread,
  bounded by a timeout, the result reused for a second so probes cannot hammer the disk).
  503 with the reasons otherwise. The systemd watchdog uses the same check.
- `GET /metrics`: the Prometheus exposition (text or OpenMetrics, as the scraper asks).

Serve them on an internal interface or behind your proxy's access rules: they carry no ids or
secrets, but there is no reason to publish them.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import orjson
import trio
from quart import Quart, Response, request

from ..engine.core import VerdantCore
from .metrics import PrometheusObserver

log = logging.getLogger(__name__)


def _probe_directory(directory: Path) -> None:
    """Create, write, fsync and remove a small file: what storing a shard needs to work."""
    path = directory / f".verdant-probe-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)


class Health:
    """The readiness check shared by `/readyz` and the systemd watchdog."""

    def __init__(
        self,
        core: VerdantCore,
        storage_dirs: Sequence[Path],
        *,
        probe_timeout_s: float = 2.0,
        probe_reuse_s: float = 1.0,
    ) -> None:
        self.core = core
        self.storage_dirs = list(storage_dirs)
        self.probe_timeout_s = probe_timeout_s
        self.probe_reuse_s = probe_reuse_s
        self.listening = False
        """Set by the daemon once the listeners are bound (embedding apps: leave it to us)."""
        self._lock = trio.Lock()
        self._last_probe_at = -float("inf")
        self._last_problems: list[str] = []

    async def problems(self) -> list[str]:
        """Why the server should not get traffic now; empty when ready."""
        found: list[str] = []
        if not self.core.running.is_set():
            found.append("the sync core is not running")
        if self.core.shutting_down:
            found.append("shutting down")
        if not self.listening:
            found.append("not listening yet")
        found.extend(await self.storage_problems())
        return found

    async def storage_problems(self) -> list[str]:
        async with self._lock:
            now = trio.current_time()
            if now - self._last_probe_at < self.probe_reuse_s:
                return list(self._last_problems)
            found: list[str] = []
            for directory in self.storage_dirs:
                with trio.move_on_after(self.probe_timeout_s) as scope:
                    try:
                        await trio.to_thread.run_sync(
                            _probe_directory, directory, abandon_on_cancel=True
                        )
                    except OSError as exc:
                        found.append(f"storage not writable: {directory}: {exc.strerror or exc}")
                if scope.cancelled_caught:
                    found.append(
                        f"storage not writable: {directory}: no answer within "
                        f"{self.probe_timeout_s:g} s"
                    )
            if found and found != self._last_problems:
                log.warning("storage check failed problems=%s", "; ".join(found))
            self._last_probe_at = trio.current_time()
            self._last_problems = found
            return list(found)

    async def healthy(self) -> bool:
        """For the watchdog: running and storage writable (a shutdown has its own deadline)."""
        return self.core.running.is_set() and not await self.storage_problems()


def _json(data: object, status: int = 200) -> Response:
    response = Response(orjson.dumps(data), status=status, content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def register_health(
    app: Quart,
    core: VerdantCore,
    *,
    health: Health | None = None,
    metrics: PrometheusObserver | None = None,
) -> Health:
    """Add the three routes to `app`; returns the `Health` the daemon marks as listening.

    Without a given `health` (embedding), readiness checks the core's databases directory and
    counts the app as listening, since it is answering.
    """
    if health is None:
        health = Health(core, [core.settings.libraries.databases_dir])
        health.listening = True
    checker = health

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        problems = await checker.problems()
        if problems:
            return _json({"status": "unavailable", "problems": problems}, 503)
        return _json({"status": "ok"})

    if metrics is not None:
        observer = metrics

        @app.get("/metrics")
        async def metrics_route() -> Response:
            body, content_type = observer.render(request.headers.get("Accept"))
            response = Response(body, content_type=content_type)
            response.headers["Cache-Control"] = "no-store"
            return response

    return health
