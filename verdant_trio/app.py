"""HTTP and websocket on one port: a Quart-Trio app for HTTP, a thin ASGI path for the sync socket.

The sync websocket is served straight from ASGI events rather than through Quart's websocket
wrapper: it saves a task hop and a signal per frame (the frame path is the server's hot path, see
PERFORMANCE.md) and lets us refuse a bad token with a real HTTP 401 and a Verdant error body
before the upgrade. Everything else (HTTP sync, admin API, dev token route, files) is Quart.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import orjson
from quart import Blueprint, Quart, Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .connections import Disconnected
from .core import VerdantCore
from .errors import ErrorCode, VerdantError
from .protocol import ProtocolError, ReplicaType, decode_json
from .tokens import TokenProvider

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class AppSettings:
    sync_path: str = "/verdant"
    admin_path: str | None = "/admin"
    admin_token: str | None = None
    """None with `admin_open` False: admin API disabled."""
    admin_open: bool = False
    """Quickstart only: the admin API needs no token."""
    dev_token_secret: str | None = None
    """Quickstart only: serve `GET /auth/{library}` minting tokens with this secret."""
    cors_origins: tuple[str, ...] | None = None
    """None: reflect any origin, like the reference CLI server."""
    max_body_bytes: int = 100 * 1024 * 1024
    body_timeout_s: float = 300.0
    extra_headers: dict[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status=status, content_type="application/json")


def error_response(error: VerdantError) -> Response:
    return json_response(error.to_body(), error.http_status)


def bearer_token(header: str | None) -> str | None:
    """`Authorization: Bearer <token>`; anything else is treated as an invalid token."""
    if header is None:
        return None
    kind, _, token = header.strip().partition(" ")
    if kind != "Bearer":
        raise VerdantError(ErrorCode.INVALID_TOKEN, "authorization type must be Bearer")
    return token.strip() or None


def create_quart_app(core: VerdantCore, settings: AppSettings) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["BODY_TIMEOUT"] = settings.body_timeout_s
    app.config["RESPONSE_TIMEOUT"] = None
    sync_path = settings.sync_path.rstrip("/") or "/"

    def origin_allowed(origin: str) -> bool:
        return settings.cors_origins is None or origin in settings.cors_origins

    @app.before_request
    async def preflight() -> Response | None:
        if request.method == "OPTIONS":
            return Response(b"", status=204)
        return None

    @app.after_request
    async def cors(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers.add("Vary", "Origin")
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Headers"] = (
                    request.headers.get("Access-Control-Request-Headers")
                    or "Content-Type, Authorization, X-Request-Id"
                )
                response.headers["Access-Control-Allow-Methods"] = (
                    "GET, HEAD, PUT, POST, DELETE, PATCH"
                )
                response.headers["Access-Control-Max-Age"] = "600"
        for key, value in settings.extra_headers.items():
            response.headers.setdefault(key, value)
        return response

    @app.errorhandler(VerdantError)
    async def verdant_error(error: VerdantError) -> Response:
        if error.http_status >= 500:
            log.error("request failed path=%s error=%s", request.path, error)
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = {
            400: ErrorCode.INVALID_REQUEST, 401: ErrorCode.INVALID_TOKEN,
            403: ErrorCode.FORBIDDEN, 404: ErrorCode.NOT_FOUND,
            413: ErrorCode.PAYLOAD_TOO_LARGE,
        }.get(status, ErrorCode.INVALID_REQUEST if status < 500 else ErrorCode.UNEXPECTED)
        return json_response({"code": int(code), "message": error.description or error.name}, status)

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unexpected error path=%s", request.path)
        return json_response({"code": int(ErrorCode.UNEXPECTED), "message": "internal error"}, 500)

    app.register_blueprint(sync_blueprint(core), url_prefix=sync_path if sync_path != "/" else None)

    if settings.admin_path is not None and (settings.admin_open or settings.admin_token):
        register_admin(app, core, settings)

    if settings.dev_token_secret is not None:
        register_dev_auth(app, settings)

    return app


def sync_blueprint(core: VerdantCore, name: str = "verdant_sync") -> Blueprint:
    """The sync endpoint (HTTP push/pull and websocket) as a blueprint, for any prefix.

    Register it where the app's tokens say the sync endpoint is (`url` claim). In the daemon the
    websocket route is never reached: `VerdantAsgi` serves the socket before Quart sees it.
    """
    bp = Blueprint(name, __name__)

    @bp.post("")
    @bp.post("/")
    async def http_sync() -> Response:
        info = core.verify(bearer_token(request.headers.get("Authorization")))
        raw = await request.get_data(cache=False)
        if not raw:
            raise VerdantError(ErrorCode.BODY_REQUIRED, "body must be {\"messages\": [...]}")
        try:
            body = decode_json(raw)
        except ProtocolError as exc:
            raise VerdantError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        messages = core.parse_http_body(body)
        result = await core.http_sync(info, messages)
        return Response(result, content_type="application/json")

    @bp.websocket("")
    @bp.websocket("/")
    async def sync_socket() -> Response | None:
        try:
            protocols = list(websocket.requested_subprotocols)
            token = protocols[1] if len(protocols) >= 2 and protocols[0] == "Bearer" else None
            info = core.verify(token or websocket.args.get("token"))
            core.admit_websocket(info)
        except VerdantError as error:
            return error_response(error)

        async def accept() -> None:
            await websocket.accept(subprotocol="Bearer" if token else None)

        try:
            await core.serve_websocket(info, accept, QuartWebSocket())
        except VerdantError as error:
            return error_response(error)
        return None

    return bp


class QuartWebSocket:
    """The sync socket through Quart's websocket context (the embedding blueprint)."""

    def __init__(self) -> None:
        self._ws = websocket._get_current_object()  # type: ignore[attr-defined]
        self.closed = False

    async def receive(self) -> str | bytes:
        return await self._ws.receive()  # type: ignore[no-any-return]

    async def send(self, text: str) -> None:
        await self._ws.send(text)

    async def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            await self._ws.close(code, reason)


def register_admin(app: Quart, core: VerdantCore, settings: AppSettings) -> None:
    prefix = (settings.admin_path or "").rstrip("/")

    def authorize() -> None:
        if settings.admin_open:
            return
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise VerdantError(ErrorCode.NO_TOKEN, "admin token required")
        assert settings.admin_token is not None
        if not hmac.compare_digest(token.encode(), settings.admin_token.encode()):
            log.warning("admin request with a wrong token path=%s", request.path)
            raise VerdantError(ErrorCode.INVALID_TOKEN, "invalid admin token")

    @app.get(f"{prefix}/libraries/<path:library_id>/documents/<collection>/<document_id>")
    async def admin_document(library_id: str, collection: str, document_id: str) -> Response:
        authorize()
        return json_response(await core.document(library_id, collection, document_id))

    @app.get(f"{prefix}/libraries/<path:library_id>/files/<file_id>")
    async def admin_file(library_id: str, file_id: str) -> Response:
        authorize()
        info = await core.file_info(library_id, file_id)
        # `fileName` too: Verdant's own integration suite reads that name.
        return json_response({**info, "fileName": info["name"]})

    @app.post(f"{prefix}/libraries/<path:library_id>/evict")
    async def admin_evict(library_id: str) -> Response:
        authorize()
        await core.evict(library_id)
        return json_response({"success": True})

    @app.post(f"{prefix}/libraries/<path:library_id>/users/<user_id>/evict")
    async def admin_evict_user(library_id: str, user_id: str) -> Response:
        authorize()
        count = await core.evict_user(library_id, user_id)
        return json_response({"success": True, "replicasRemoved": count})

    @app.post(f"{prefix}/libraries/<path:library_id>/replicas/<replica_id>/force-truant")
    async def admin_force_truant(library_id: str, replica_id: str) -> Response:
        authorize()
        await core.force_truant(library_id, replica_id)
        return json_response({"success": True})

    @app.get(f"{prefix}/libraries/<path:library_id>")
    async def admin_info(library_id: str) -> Response:
        authorize()
        return json_response(await core.info(library_id))


def register_dev_auth(app: Quart, settings: AppSettings) -> None:
    """The quickstart's token route: anyone gets a token for any library. Never in production."""
    assert settings.dev_token_secret is not None
    provider = TokenProvider(settings.dev_token_secret)

    @app.get("/auth/<path:library_id>")
    async def dev_auth(library_id: str) -> Response:
        user = request.args.get("userId") or request.args.get("user") or "anonymous"
        raw_type = request.args.get("type", "0")
        try:
            replica_type = ReplicaType(int(raw_type))
        except ValueError:
            raise VerdantError(ErrorCode.INVALID_REQUEST, f"unknown replica type {raw_type!r}") from None
        host = request.headers.get("Host") or request.host
        sync_url = f"{request.scheme}://{host}{settings.sync_path}"
        token = provider.get_token(
            library_id, user, sync_url, type=replica_type, expires_in="1d"
        )
        return json_response({"accessToken": token})


class AsgiWebSocket:
    """The sync socket over raw ASGI websocket events (hypercorn)."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.closed = False

    async def receive(self) -> str | bytes:
        while True:
            event = await self._receive()
            kind = event["type"]
            if kind == "websocket.receive":
                text = event.get("text")
                if text is not None:
                    return str(text)
                return bytes(event.get("bytes") or b"")
            if kind == "websocket.disconnect":
                self.closed = True
                raise Disconnected()

    async def send(self, text: str) -> None:
        if self.closed:
            raise Disconnected()
        await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


def websocket_token(scope: Scope) -> str | None:
    """The reference reads `Sec-WebSocket-Protocol: Bearer, <token>` (browsers cannot set an
    Authorization header on a websocket), else `?token=`."""
    protocols = [p.strip() for p in scope.get("subprotocols") or []]
    if len(protocols) >= 2 and protocols[0] == "Bearer":
        return protocols[1] or None
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("token")
    return values[0] if values else None


async def deny_websocket(scope: Scope, send: Send, error: VerdantError) -> None:
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = orjson.dumps(error.to_body())
        await send(
            {
                "type": "websocket.http.response.start",
                "status": error.http_status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


class VerdantAsgi:
    """The ASGI app: the sync websocket path handled here, everything else by Quart."""

    def __init__(self, core: VerdantCore, quart_app: Quart, settings: AppSettings) -> None:
        self.core = core
        self.quart = quart_app
        self.settings = settings
        self._sync_path = settings.sync_path.rstrip("/") or "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"].rstrip("/") == self._sync_path.rstrip("/"):
            await self.websocket(scope, receive, send)
        else:
            await self.quart(scope, receive, send)  # type: ignore[arg-type]

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        transport = AsgiWebSocket(receive, send)
        accepted = False

        async def accept() -> None:
            nonlocal accepted
            subprotocols = scope.get("subprotocols") or []
            message: dict[str, Any] = {"type": "websocket.accept"}
            if subprotocols and subprotocols[0].strip() == "Bearer":
                # Node `ws` clients refuse a connection that does not pick one of their
                # offered subprotocols.
                message["subprotocol"] = "Bearer"
            await send(message)
            accepted = True

        try:
            info = self.core.verify(websocket_token(scope))
            await self.core.serve_websocket(info, accept, transport)
        except VerdantError as error:
            log.info(
                "websocket refused status=%d code=%d reason=%s client=%s",
                error.http_status, int(error.code), error.message,
                (scope.get("client") or ("?",))[0],
            )
            if not accepted:
                await deny_websocket(scope, send, error)
            else:
                await transport.close(1011, error.message[:120])
        except Disconnected:
            pass


def create_asgi_app(core: VerdantCore, settings: AppSettings) -> VerdantAsgi:
    return VerdantAsgi(core, create_quart_app(core, settings), settings)
