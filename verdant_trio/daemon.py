"""The server process: the nursery tree that owns the core and the HTTP server, and its shutdown.

Nursery tree: `serve` → core (library tasks) → hypercorn (listeners → connections). Shutdown
order is designed: stop accepting and tell websockets "going away" (1001), let hypercorn give
handlers `graceful_timeout_s` to finish, then cancel the library tasks, each of which finishes
the batch in hand (a worker thread is never abandoned) and checkpoints and closes its shard.
"""

from __future__ import annotations

import logging
import signal
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .app import create_asgi_app
from .config import ServerSettings
from .core import open_core
from .files import LocalFileStorage

log = logging.getLogger(__name__)


def hypercorn_config(settings: ServerSettings) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.websocket_max_message_size = settings.max_message_bytes
    config.graceful_timeout = settings.graceful_timeout_s
    config.keep_alive_timeout = 75
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    return config


async def serve(
    settings: ServerSettings,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown` is set; reports the bound addresses once listening."""
    file_storage = (
        LocalFileStorage(settings.files_dir, settings.files_public_url)
        if settings.files_dir is not None
        else None
    )
    async with open_core(
        settings.core,
        token_secret=settings.token_secret,
        profiles=settings.profiles,
        file_storage=file_storage,
    ) as core:
        asgi = create_asgi_app(core, settings.app)

        async def shutdown_trigger() -> None:
            await shutdown.wait()
            log.info("shutting down: closing connections")
            core.begin_shutdown()

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(
                    hypercorn_serve,
                    asgi,  # type: ignore[arg-type]
                    hypercorn_config(settings),
                    shutdown_trigger=shutdown_trigger,
                )
            )
            log.info("listening on %s", " ".join(binds))
            task_status.started(binds)
    log.info("stopped: every library closed")


async def run_until_signalled(
    settings: ServerSettings,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve` with SIGINT/SIGTERM as the shutdown trigger."""
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    shutdown.set()
                    return

        nursery.start_soon(watch_signals)
        binds = await nursery.start(partial(serve, settings, shutdown=shutdown))
        task_status.started(binds)
        await shutdown.wait()
        # `serve` returns once everything is closed; the signal watcher already returned.
