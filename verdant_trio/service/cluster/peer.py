"""The node-to-node API as its clients see it: a target pulling from its source, and
`verdant-trio cluster move|rebalance|status` asking every node (`transfer` serves it).

Every request carries the cluster secret as a bearer token. Transport failures and refusals
become one `PeerError` that names the node and, for a refusal, its status and message, so the
orchestrator can tell "refused" (the node answered: nothing happened there) from "unreachable"
(it may or may not have happened).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final

import httpx
import orjson

from .copies import CHUNK_BYTES

CONNECT_TIMEOUT_S: Final = 5.0
REQUEST_TIMEOUT_S: Final = 30.0
"""A short request (status, lock, placement, finish); long ones pass their own bound."""


class PeerError(Exception):
    """A node refused a request (`status` set) or could not be reached (`status` None)."""

    def __init__(self, node: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node
        self.status = status
        self.message = message

    @property
    def refused(self) -> bool:
        """The node answered with a refusal: it did not do what was asked."""
        return self.status is not None and self.status < 500


class Peer:
    """One node's internal listener."""

    def __init__(self, name: str, url: str, secret: str, http: httpx.AsyncClient) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {secret}"}
        self._http = http

    def __repr__(self) -> str:  # never the secret
        return f"Peer({self.name!r}, {self.url!r})"

    async def call(
        self, method: str, path: str, body: Any = None, *, timeout_s: float = REQUEST_TIMEOUT_S
    ) -> Any:
        """A JSON request; its JSON answer (text for `text/plain`)."""
        try:
            response = await self._http.request(
                method, self.url + path, headers=self._headers,
                content=None if body is None else orjson.dumps(body),
                timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
            )
        except httpx.HTTPError as exc:
            raise PeerError(self.name, f"{method} {path}: {_describe(exc)}") from None
        if response.status_code >= 300:
            raise PeerError(
                self.name, f"{method} {path}: {_message(response)}", status=response.status_code
            )
        if response.headers.get("content-type", "").startswith("text/plain"):
            return response.text
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise PeerError(self.name, f"{method} {path}: the answer is not JSON") from None

    async def download(
        self, path: str, write: Callable[[bytes], Awaitable[None]], *, timeout_s: float
    ) -> int:
        """Stream a file to `write`, chunk by chunk (never whole in memory); its size."""
        size = 0
        try:
            async with self._http.stream(
                "GET", self.url + path, headers=self._headers,
                timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise PeerError(
                        self.name, f"GET {path}: {_message(response)}",
                        status=response.status_code,
                    )
                async for chunk in response.aiter_raw(CHUNK_BYTES):
                    size += len(chunk)
                    await write(chunk)
        except httpx.HTTPError as exc:
            raise PeerError(self.name, f"GET {path}: {_describe(exc)}") from None
        return size


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return f"unreachable ({type(exc).__name__}: {exc})" if str(exc) else "unreachable"


def _message(response: httpx.Response) -> str:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return f"{response.status_code} {body['error']}"
    return f"{response.status_code} {response.text[:200]!r}"


@contextlib.asynccontextmanager
async def open_peers(urls: Mapping[str, str], secret: str) -> AsyncIterator[dict[str, Peer]]:
    """A `Peer` for each node (name -> internal base URL), sharing one connection pool."""
    async with httpx.AsyncClient(trust_env=False) as http:  # no proxy between nodes
        yield {name: Peer(name, url, secret, http) for name, url in urls.items()}
