"""HTTP and websocket on one port: a Quart-Trio app for HTTP, thin paths for the sync socket.

The daemon serves the sync websocket from the TCP stream (`listeners`, `stream_socket` here);
an upgrade hypercorn receives (one on a kept-alive connection) is served from ASGI events
rather than through Quart's websocket wrapper, which saves a task hop and a signal per frame.
Both refuse a bad token with a real HTTP 401 and a Verdant error body before the upgrade.
Everything else (HTTP sync, admin API, dev token route, files) is Quart.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from functools import partial
from typing import Any
from urllib.parse import parse_qs, quote

import orjson
import trio
from quart import Blueprint, Quart, Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..engine.budget import Reservation
from ..engine.connections import Transport
from ..engine.core import VerdantCore
from ..engine.registry import NotServedHere
from ..storage.files import LocalFileStorage
from ..storage.names import decode_name
from ..sync.codes import CloseCode
from ..sync.errors import Disconnected, ErrorCode, VerdantError
from ..sync.protocol import ProtocolError, ReplicaType, decode_json
from ..sync.tokens import TokenProvider
from .file_responses import is_active_content, open_stored, plan_file_response
from .multipart import UploadTooLarge, open_multipart_file
from .settings import AppSettings
from .upgrade import UpgradeRequest
from .websocket import StreamWebSocket

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 64 * 1024
"""Room for boundaries and part headers around an upload of the maximum size."""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _has_body(headers: Any) -> bool:
    length = headers.get("Content-Length")
    return bool(length and length != "0") or "chunked" in headers.get("Transfer-Encoding", "")


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status=status, content_type="application/json")


def error_response(error: VerdantError) -> Response:
    response = json_response(error.to_body(), error.http_status)
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(error.retry_after_s)
    return response


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
    app.config["MAX_CONTENT_LENGTH"] = max(
        settings.max_body_bytes, core.settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    )
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
        if response.status_code >= 400 and _has_body(request.headers):
            # Refused before its body was read: hypercorn cannot finish that request cycle, and a
            # keep-alive connection would hang on the next request. Make the client reconnect.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(VerdantError)
    async def verdant_error(error: VerdantError) -> Response:
        if isinstance(error, NotServedHere):  # a cluster's routing at work, not a failure
            core.observer.refused("http")
            log.info("refused: library not served here path=%s", request.path)
        elif error.http_status >= 500:
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

    app.register_blueprint(
        sync_blueprint(core, max_body_bytes=settings.max_body_bytes),
        url_prefix=sync_path if sync_path != "/" else None,
    )

    if settings.admin_path is not None and (settings.admin_open or settings.admin_token):
        register_admin(app, core, settings)

    if settings.dev_token_secret is not None:
        register_dev_auth(app, settings)

    if isinstance(core.file_storage, LocalFileStorage):
        app.register_blueprint(file_serving_blueprint(core, core.file_storage))

    return app


async def read_limited(max_bytes: int) -> bytes:
    """The request body, refused with 413 past `max_bytes` (the app-wide limit is the larger
    upload limit, so sync requests need their own)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise VerdantError(ErrorCode.PAYLOAD_TOO_LARGE, f"body is larger than {max_bytes} bytes")
    data = bytearray()
    async for chunk in request.body:
        data += chunk
        if len(data) > max_bytes:
            raise VerdantError(ErrorCode.PAYLOAD_TOO_LARGE, f"body is larger than {max_bytes} bytes")
    return bytes(data)


def sync_blueprint(
    core: VerdantCore,
    name: str = "verdant_sync",
    *,
    max_body_bytes: int = 100 * 1024 * 1024,
) -> Blueprint:
    """The sync endpoint (HTTP push/pull and websocket) as a blueprint, for any prefix.

    Register it where the app's tokens say the sync endpoint is (`url` claim). In the daemon the
    websocket route is never reached: `VerdantAsgi` serves the socket before Quart sees it.
    """
    bp = Blueprint(name, __name__)

    @bp.post("")
    @bp.post("/")
    async def http_sync() -> Response:
        info = core.verify(bearer_token(request.headers.get("Authorization")))
        raw = await read_limited(max_body_bytes)
        if not raw:
            raise VerdantError(ErrorCode.BODY_REQUIRED, "body must be {\"messages\": [...]}")
        try:
            body = decode_json(raw)
        except ProtocolError as exc:
            raise VerdantError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        messages = core.parse_http_body(body)
        result = await core.http_sync(info, messages)
        return Response(result, content_type="application/json")

    @bp.get("/files/<file_id>")
    async def file_info(file_id: str) -> Response:
        info = core.verify(bearer_token(request.headers.get("Authorization")))
        return json_response(await core.admin.file_info(info.library_id, file_id, request_origin()))

    @bp.post("/files/<file_id>")
    async def upload_file(file_id: str) -> Response:
        # Embedding path (Quart buffers what the network delivers faster than we write; the
        # daemon streams uploads at the ASGI level with real backpressure instead).
        info = core.verify(bearer_token(request.headers.get("Authorization")))
        upload = await open_multipart_file(
            aiter(request.body), request.headers.get("Content-Type"),
            max_bytes=core.settings.max_upload_bytes,
        )
        await core.files.upload(info, file_id, upload)
        return json_response({"success": True})

    @bp.websocket("")
    @bp.websocket("/")
    async def sync_socket() -> Response | None:
        try:
            in_protocols = socket_token(list(websocket.requested_subprotocols), b"")
            info = core.verify(in_protocols or socket_token((), websocket.query_string))
            core.admit_websocket(info)
        except VerdantError as error:
            return error_response(error)

        async def accept() -> None:
            await websocket.accept(subprotocol="Bearer" if in_protocols else None)

        try:
            await core.serve_websocket(info, accept, QuartWebSocket())
        except VerdantError as error:
            return error_response(error)
        return None

    return bp


class _EventTransport:
    """What an event-driven websocket (Quart, ASGI) lacks of the stream socket's transport:
    every message goes through the connection's writer, and no memory is reserved here (the
    server under it bounds its own messages)."""

    def buffered(self) -> bool:
        return False

    def take_reservation(self) -> list[Reservation]:
        return []

    def release_all(self) -> None:
        pass

    def write_now(self, *payloads: bytes) -> bool:
        return False

    @property
    def pending_output(self) -> bool:
        return False

    async def flush(self) -> None:
        pass


class QuartWebSocket(_EventTransport):
    """The sync socket through Quart's websocket context (the embedding blueprint)."""

    def __init__(self) -> None:
        self._ws = websocket._get_current_object()  # type: ignore[attr-defined]
        self.closed = False

    async def receive(self) -> str | bytes:
        return await self._ws.receive()  # type: ignore[no-any-return]

    async def send(self, payload: bytes) -> None:
        await self._ws.send(payload.decode())

    async def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            await self._ws.close(code, reason)


def request_origin() -> str:
    return request.host_url.rstrip("/")


def file_serving_blueprint(
    core: VerdantCore, storage: LocalFileStorage, name: str = "verdant_files"
) -> Blueprint:
    """`GET /files/<library>/<file id>/<name>`: ranges, ETag/Last-Modified, streamed.

    Only files that still have metadata are served, with the type stored at upload. Types a
    browser would run as a page or script of our origin download as attachments unless
    configured otherwise, and nothing is sniffed.
    """

    bp = Blueprint(name, __name__)

    def decoded(library_name: str, file_name: str) -> tuple[str, str]:
        try:
            return decode_name(library_name), decode_name(file_name)
        except ValueError:
            raise VerdantError(ErrorCode.NOT_FOUND, "file not found") from None

    @bp.route("/files/<int:slot>/<library_name>/<file_name>/<name>", methods=["GET", "HEAD"])
    async def serve_slot_file(slot: int, library_name: str, file_name: str, name: str) -> Response:
        """The cluster form of a file URL: the slot first, for the front to route by."""
        library_id, _ = decoded(library_name, file_name)
        if storage.slot_of is None or storage.slot_of(library_id) != slot:
            raise VerdantError(ErrorCode.NOT_FOUND, "file not found")
        return await serve(library_name, file_name, name)

    @bp.route("/files/<library_name>/<file_name>/<name>", methods=["GET", "HEAD"])
    async def serve_file(library_name: str, file_name: str, name: str) -> Response:
        library_id, _ = decoded(library_name, file_name)
        if storage.slot_of is not None and not core.owns(library_id):
            # The front sends a link without a slot (minted before the cluster, or an encoded
            # name it cannot hash) to any node: point it at the slot form, which it routes.
            parts = [str(storage.slot_of(library_id)), library_name, file_name, name]
            response = Response(b"", status=307)
            response.headers["Location"] = "/files/" + "/".join(quote(p, safe="") for p in parts)
            return response
        return await serve(library_name, file_name, name)

    async def serve(library_name: str, file_name: str, name: str) -> Response:
        library_id, file_id = decoded(library_name, file_name)
        core.require_owner(library_id)  # 503 before 404: the file may be on its owner
        path = storage.locate(library_name, file_name, name)
        if path is None:
            raise VerdantError(ErrorCode.NOT_FOUND, "file not found")
        content_type = await core.files.served_type(library_id, file_id)
        if content_type is None:
            raise VerdantError(ErrorCode.NOT_FOUND, "file not found")
        opened = await open_stored(path)
        if opened is None:
            raise VerdantError(ErrorCode.NOT_FOUND, "file not found")
        file, stat = opened
        plan = plan_file_response(stat, content_type, dict(request.headers))
        body: AsyncIterator[bytes] | bytes = b""
        if request.method == "GET" and plan.status in (200, 206):
            body = plan.body(file)
        else:
            await file.aclose()
        response = Response(body, status=plan.status, headers=plan.headers)
        if plan.status in (200, 206):
            response.timeout = None  # big files take their time
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
        response.headers["Cache-Control"] = "private, max-age=3600"
        if is_active_content(content_type) and not core.settings.serve_active_content_inline:
            response.headers["Content-Disposition"] = (
                f"attachment; filename*=UTF-8''{quote(path.name, safe='')}"
            )
        return response

    return bp


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
        return json_response(
            await core.admin.document(library_id, collection, document_id, request_origin())
        )

    @app.get(f"{prefix}/libraries/<path:library_id>/files/<file_id>")
    async def admin_file(library_id: str, file_id: str) -> Response:
        authorize()
        info = await core.admin.file_info(library_id, file_id, request_origin())
        # `fileName` too: Verdant's own integration suite reads that name.
        return json_response({**info, "fileName": info["name"]})

    @app.post(f"{prefix}/libraries/<path:library_id>/evict")
    async def admin_evict(library_id: str) -> Response:
        authorize()
        await core.admin.evict(library_id)
        return json_response({"success": True})

    @app.post(f"{prefix}/libraries/<path:library_id>/users/<user_id>/evict")
    async def admin_evict_user(library_id: str, user_id: str) -> Response:
        authorize()
        count = await core.admin.evict_user(library_id, user_id)
        return json_response({"success": True, "replicasRemoved": count})

    @app.post(f"{prefix}/libraries/<path:library_id>/replicas/<replica_id>/force-truant")
    async def admin_force_truant(library_id: str, replica_id: str) -> Response:
        authorize()
        await core.admin.force_truant(library_id, replica_id)
        return json_response({"success": True})

    @app.get(f"{prefix}/libraries/<path:library_id>")
    async def admin_info(library_id: str) -> Response:
        authorize()
        return json_response(await core.admin.info(library_id))


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


class AsgiWebSocket(_EventTransport):
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

    async def send(self, payload: bytes) -> None:
        if self.closed:
            raise Disconnected()
        try:
            await self._send({"type": "websocket.send", "text": payload.decode()})
        except (trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError, OSError):
            # hypercorn closing the socket under us (its close does not take its send lock)
            self.closed = True
            raise Disconnected() from None

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


def socket_token(subprotocols: Sequence[str], query_string: bytes) -> str | None:
    """The reference reads `Sec-WebSocket-Protocol: Bearer, <token>` (browsers cannot set an
    Authorization header on a websocket), else `?token=`."""
    protocols = [p.strip() for p in subprotocols]
    if len(protocols) >= 2 and offers_bearer(protocols):
        return protocols[1] or None
    values = parse_qs(query_string.decode("latin-1")).get("token")
    return values[0] if values else None


def offers_bearer(subprotocols: Sequence[str]) -> bool:
    """Node `ws` clients refuse a connection that does not pick one of their offered
    subprotocols; the token rides as the second one after "Bearer"."""
    return bool(subprotocols) and subprotocols[0].strip() == "Bearer"


async def deny_websocket(scope: Scope, send: Send, error: VerdantError) -> None:
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = orjson.dumps(error.to_body())
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if error.retry_after_s is not None:
            headers.append((b"retry-after", str(error.retry_after_s).encode()))
        await send(
            {"type": "websocket.http.response.start", "status": error.http_status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": int(CloseCode.POLICY)})


class VerdantAsgi:
    """The ASGI app: the sync websocket path handled here, everything else by Quart."""

    def __init__(self, core: VerdantCore, quart_app: Quart, settings: AppSettings) -> None:
        self.core = core
        self.quart = quart_app
        self.settings = settings
        self._sync_path = settings.sync_path.rstrip("/") or "/"
        self._files_prefix = self._sync_path.rstrip("/") + "/files/"

    def is_sync_path(self, path: str) -> bool:
        return path.rstrip("/") == self._sync_path.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "websocket" and self.is_sync_path(path):
            await self.websocket(scope, receive, send)
        elif (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and path.startswith(self._files_prefix)
            and "/" not in path[len(self._files_prefix):]
            and len(path) > len(self._files_prefix)
        ):
            await self.upload(scope, receive, send, path[len(self._files_prefix):])
        else:
            await self.quart(scope, receive, send)  # type: ignore[arg-type]

    async def upload(self, scope: Scope, receive: Receive, send: Send, file_id: str) -> None:
        """`POST {sync}/files/{id}` read straight from ASGI events.

        Hypercorn queues a bounded number of body events and stops reading the socket when the
        queue is full, so a slow disk slows the client down instead of growing our memory.
        """
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status, body = 200, b'{"success":true}'
        retry_after_s: int | None = None
        try:
            info = self.core.verify(bearer_token(headers.get("authorization")))
            self.core.require_owner(info.library_id)  # from the headers, before the body
            limit = self.core.settings.max_upload_bytes
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD_BYTES:
                raise UploadTooLarge(limit)
            upload = await open_multipart_file(
                _asgi_body(receive), headers.get("content-type"), max_bytes=limit
            )
            await self.core.files.upload(info, file_id, upload)
        except VerdantError as error:
            if isinstance(error, NotServedHere):
                self.core.observer.refused("http")
                log.info("upload refused: library not served here file=%s", file_id)
            elif error.http_status >= 500:
                log.error("upload failed file=%s error=%s", file_id, error)
            else:
                log.info("upload refused file=%s status=%d reason=%s", file_id, error.http_status, error.message)
            status, body = error.http_status, orjson.dumps(error.to_body())
            retry_after_s = error.retry_after_s
        except _ClientGone:
            log.info("upload interrupted by the client file=%s", file_id)
            return
        response_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if status >= 400:
            response_headers.append((b"connection", b"close"))  # the body may be unread
        if retry_after_s is not None:
            response_headers.append((b"retry-after", str(retry_after_s).encode()))
        origin = headers.get("origin")
        if origin and (self.settings.cors_origins is None or origin in self.settings.cors_origins):
            response_headers += [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-credentials", b"true"),
                (b"vary", b"Origin"),
            ]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The sync socket through hypercorn: embedding, or an upgrade on a kept-alive connection
        (a fresh connection's upgrade is served by `stream_socket`)."""
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        subprotocols = scope.get("subprotocols") or []

        async def accept() -> None:
            message: dict[str, Any] = {"type": "websocket.accept"}
            if offers_bearer(subprotocols):
                message["subprotocol"] = "Bearer"
            await send(message)

        await run_sync_socket(
            self.core,
            socket_token(subprotocols, scope.get("query_string", b"")),
            AsgiWebSocket(receive, send),
            accept=accept,
            deny=partial(deny_websocket, scope, send),
            client=str((scope.get("client") or ("?",))[0]),
        )

    async def stream_socket(
        self, upgrade: UpgradeRequest, transport: StreamWebSocket, client: str
    ) -> None:
        """The sync socket served from the TCP stream (`listeners`), the daemon's usual path."""

        async def accept() -> None:
            subprotocol = "Bearer" if offers_bearer(upgrade.subprotocols) else None
            await transport.accept(upgrade.key, subprotocol)

        async def deny(error: VerdantError) -> None:
            with trio.move_on_after(self.core.settings.connections.close_timeout_s):
                await transport.refuse(
                    error.http_status, orjson.dumps(error.to_body()), error.retry_after_s
                )

        await run_sync_socket(
            self.core, socket_token(upgrade.subprotocols, upgrade.query_string), transport,
            accept=accept, deny=deny, client=client,
        )


async def run_sync_socket(
    core: VerdantCore,
    token: str | None,
    transport: Transport,
    *,
    accept: Callable[[], Awaitable[None]],
    deny: Callable[[VerdantError], Awaitable[None]],
    client: str,
) -> None:
    """Verify, accept once the library is ready, serve; a refusal before the upgrade is an
    HTTP error with a Verdant body, after it a close with 1011."""
    accepted = False

    async def accept_once() -> None:
        nonlocal accepted
        await accept()
        accepted = True

    try:
        info = core.verify(token)
        await core.serve_websocket(info, accept_once, transport)
    except VerdantError as error:
        log.info(
            "websocket refused status=%d code=%d reason=%s client=%s",
            error.http_status, int(error.code), error.message, client,
        )
        if not accepted:
            await deny(error)
        else:
            await transport.close(CloseCode.INTERNAL_ERROR, error.message[:120])
    except Disconnected:
        pass


class _ClientGone(Exception):
    """The client disconnected in the middle of its request."""


async def _asgi_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = event.get("body", b"")
        if chunk:
            yield bytes(chunk)
        if not event.get("more_body", False):
            return


def create_asgi_app(core: VerdantCore, settings: AppSettings) -> VerdantAsgi:
    return VerdantAsgi(core, create_quart_app(core, settings), settings)
