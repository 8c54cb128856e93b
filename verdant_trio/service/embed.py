"""Mount Verdant inside your own Quart-Trio app (the "A real server" example of the Verdant docs).

    verdant = create_verdant(storage="verdant-dbs", token_secret=SECRET, profiles=Profiles())
    app = QuartTrio(__name__)
    app.register_blueprint(verdant.blueprint(), url_prefix="/verdant")
    verdant.init_app(app)      # library tasks start and stop with the app

    @app.get("/auth/<library_id>")
    async def auth(library_id):  # authenticate your user here, then:
        token = TokenProvider(SECRET).get_token(library_id, user_id, "https://my.app/verdant")
        return {"accessToken": token}
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from quart import Blueprint
from quart_trio import QuartTrio

from ..engine.core import VerdantCore
from ..engine.observe import NULL_OBSERVER, Observer
from ..engine.profiles import ProfileSource
from ..engine.settings import CoreSettings, LibrarySettings
from ..storage.files import FileStorage, LocalFileStorage
from ..transport.app import file_serving_blueprint, sync_blueprint


class Verdant:
    """A Verdant core plus the glue to run it inside a Quart-Trio app."""

    def __init__(self, core: VerdantCore) -> None:
        self.core = core

    def blueprint(self, name: str = "verdant_sync") -> Blueprint:
        """The sync endpoint: HTTP push/pull, websocket, file upload and file info."""
        return sync_blueprint(self.core, name)

    def files_blueprint(self, name: str = "verdant_files") -> Blueprint:
        """Serves `GET /files/<library>/<file id>/<name>` from a `LocalFileStorage`; register
        it at the root of the URL the storage's `host` points at."""
        if not isinstance(self.core.file_storage, LocalFileStorage):
            raise TypeError("files_blueprint serves a LocalFileStorage; other storages serve themselves")
        return file_serving_blueprint(self.core, self.core.file_storage, name)

    def init_app(self, app: QuartTrio) -> None:
        """Run the core in the app's nursery while it serves; stop it when the app stops."""

        @app.before_serving
        async def _start_verdant() -> None:
            await app.nursery.start(self.core.run)

    # the admin operations of the Verdant docs (`core.evict`, ...)
    async def evict(self, library_id: str) -> None:
        await self.core.admin.evict(library_id)

    async def info(self, library_id: str) -> dict[str, Any]:
        return await self.core.admin.info(library_id)

    async def document(self, library_id: str, collection: str, document_id: str) -> Any:
        return await self.core.admin.document(library_id, collection, document_id)

    async def force_truant(self, library_id: str, replica_id: str) -> None:
        await self.core.admin.force_truant(library_id, replica_id)

    async def evict_user(self, library_id: str, user_id: str) -> int:
        return await self.core.admin.evict_user(library_id, user_id)


def create_verdant(
    *,
    storage: str | Path | LibrarySettings,
    token_secret: str,
    profiles: ProfileSource | None = None,
    file_storage: FileStorage | None = None,
    observer: Observer = NULL_OBSERVER,
    log: logging.Logger | None = None,
    settings: CoreSettings | None = None,
) -> Verdant:
    """Create a Verdant core. `storage` is the databases directory (or full library settings).

    `profiles` is any object with `async get(user_id)`; `file_storage` enables file sync
    (e.g. `LocalFileStorage("verdant-files", host="https://my.app")`); `log` takes over the
    `verdant_trio` logger hierarchy if given.
    """
    libraries = storage if isinstance(storage, LibrarySettings) else LibrarySettings(
        databases_dir=Path(storage)
    )
    core_settings = replace(settings, libraries=libraries) if settings else CoreSettings(libraries)
    if log is not None:
        logging.getLogger("verdant_trio").handlers = log.handlers
        logging.getLogger("verdant_trio").setLevel(log.level)
    return Verdant(
        VerdantCore(
            core_settings,
            token_secret=token_secret,
            profiles=profiles,
            observer=observer,
            file_storage=file_storage,
        )
    )
