"""One typed settings object for the whole server."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .app import AppSettings
from .core import CoreSettings
from .libraries import LibrarySettings
from .profiles import ProfileSource

DEFAULT_MAX_MESSAGE_BYTES = 100 * 1024 * 1024
"""The reference accepts 100 MiB messages; a large first sync needs it (hypercorn's default is
16 MiB, trio-websocket's 1 MiB)."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    token_secret: str
    core: CoreSettings
    app: AppSettings = field(default_factory=AppSettings)
    host: str = "127.0.0.1"
    port: int = 3242
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    graceful_timeout_s: float = 10.0
    files_dir: Path | None = None
    files_public_url: str | None = None
    """Base URL of file links (the public origin behind a proxy); default: the request's."""
    profiles: ProfileSource | None = None


def quickstart_settings(
    *,
    port: int,
    secret: str,
    host: str,
    data_dir: Path,
    sync_path: str = "/verdant",
    admin_path: str = "/admin",
    truancy_minutes: float = 7 * 24 * 60,
) -> ServerSettings:
    """The development server of the Verdant docs: data in the current directory, open admin."""
    return ServerSettings(
        token_secret=secret,
        host=host,
        port=port,
        core=CoreSettings(
            libraries=LibrarySettings(
                databases_dir=data_dir / "verdant-dbs",
                truancy_minutes=truancy_minutes,
            )
        ),
        app=AppSettings(
            sync_path=sync_path,
            admin_path=admin_path,
            admin_open=True,
            dev_token_secret=secret,
        ),
        files_dir=data_dir / "verdant-files",
    )
