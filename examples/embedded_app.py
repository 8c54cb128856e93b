"""A real server: Verdant inside your own Quart-Trio app.

This is the "A real server" example of the Verdant docs in Python. Your app keeps its own routes
and its own login; Verdant adds the sync endpoint (HTTP push/pull, websocket, file uploads) under
a prefix of your choice, and your `/auth/<library>` route hands logged-in users a token for it.

    python examples/embedded_app.py --port 8080
    # then point a Verdant client at it:
    #   sync: { authEndpoint: 'http://localhost:8080/auth/family?session=alice-session' }

The login is a stand-in: `DEMO_SESSIONS` maps session ids (from a cookie, or `?session=` so that
command-line clients can try it) to users. Replace `current_user()` with your session lookup.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from verdant_trio import LocalFileStorage, TokenProvider, create_verdant
from verdant_trio.service.health import register_health

DEMO_SESSIONS = {"alice-session": "alice", "bob-session": "bob"}
"""Your session store: session id -> user id."""
DEMO_NAMES = {"alice": "Alice Liddell", "bob": "Bob Builder"}
"""Your user table: what presence shows of each user."""
SHARED_LIBRARIES = {"family": {"alice", "bob"}}
"""Who may sync which shared library; every user also has a personal library `<user>-notes`."""


class Profiles:
    """What other replicas see of a user in presence (cached by Verdant)."""

    async def get(self, user_id: str) -> dict[str, Any]:
        return {"id": user_id, "name": DEMO_NAMES.get(user_id, user_id)}


def current_user() -> str | None:
    session = request.cookies.get("session") or request.args.get("session")
    return DEMO_SESSIONS.get(session or "")


def may_sync(user_id: str, library_id: str) -> bool:
    return library_id == f"{user_id}-notes" or user_id in SHARED_LIBRARIES.get(library_id, set())


def create_app(data_dir: Path, token_secret: str, public_url: str | None = None) -> QuartTrio:
    verdant = create_verdant(
        storage=data_dir / "verdant-dbs",
        token_secret=token_secret,
        profiles=Profiles(),
        file_storage=LocalFileStorage(data_dir / "verdant-files", host=public_url),
    )
    app = QuartTrio(__name__)
    app.register_blueprint(verdant.blueprint(), url_prefix="/sync")
    app.register_blueprint(verdant.files_blueprint())  # GET /files/<library>/<file>/<name>
    verdant.init_app(app)  # library tasks run while the app serves
    register_health(app, verdant.core)  # /healthz, /readyz
    tokens = TokenProvider(token_secret)

    @app.get("/")
    async def home() -> dict[str, str]:
        return {"app": "verdant embedding example", "sync": "/sync", "auth": "/auth/<library>"}

    @app.get("/auth/<library_id>")
    async def auth(library_id: str) -> Response | dict[str, str]:
        user_id = current_user()
        if user_id is None:
            return Response("Please log in", status=401)
        if not may_sync(user_id, library_id):
            return Response("Not your library", status=403)
        origin = public_url or request.host_url.rstrip("/")
        token = tokens.get_token(library_id, user_id, f"{origin}/sync", expires_in="1h")
        return {"accessToken": token}

    return app


async def main(
    port: int, host: str, data_dir: Path, token_secret: str, public_url: str | None
) -> None:
    app = create_app(data_dir, token_secret, public_url)
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.websocket_max_message_size = 100 * 1024 * 1024  # a big first sync needs room
    config.errorlog = logging.getLogger("hypercorn.error")  # into our logging, once

    async def until_signalled() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return

    await serve(app, config, shutdown_trigger=until_signalled)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--data-dir", type=Path, default=Path.cwd())
    parser.add_argument("--public-url", help="the origin clients reach this app at")
    args = parser.parse_args()
    secret = os.environ.get("VERDANT_TOKEN_SECRET")
    if not secret:
        secret = secrets.token_urlsafe(32)
        print("VERDANT_TOKEN_SECRET not set: using a random secret (tokens end with the process)",
              file=sys.stderr)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    trio.run(partial(main, args.port, args.host, args.data_dir, secret, args.public_url))
