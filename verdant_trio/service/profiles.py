"""User profiles for presence: where they come from and how long we trust them.

The reference caches each profile forever. Here a source is anything with `async get(user_id)`,
wrapped in a TTL cache that falls back to `{"id": user_id}` when the source fails or is slow:
presence must never block a sync, and a profile service outage must not break connections.

Sources the daemon can be configured with:
- `HttpProfiles`: `GET https://app.internal/profiles/{user_id}` on your app, JSON object back;
- `CallableProfiles`: a Python function named `module:function` (sync or async), or an object
  with `async get(user_id)` named the same way.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx

from ..engine.profiles import ProfileLookupError, ProfileSource


class HttpProfiles:
    """Profiles from an HTTP endpoint of the app: `url` with `{user_id}` (URL-quoted) filled in.

    Expects `200` with a JSON object; anything else is a failed lookup. Connections are pooled
    and kept alive; close with `aclose()`. `headers` (e.g. an internal bearer token) are sent
    with every request and never logged.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 2.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if "{user_id}" not in url:
            raise ValueError("the profile URL needs a {user_id} placeholder")
        self.url = url
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            headers={"Accept": "application/json", **(headers or {})},
            follow_redirects=False,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
        )

    def url_for(self, user_id: str) -> str:
        return self.url.replace("{user_id}", quote(user_id, safe=""))

    async def get(self, user_id: str) -> Any:
        try:
            response = await self._client.get(self.url_for(user_id))
        except httpx.HTTPError as exc:
            raise ProfileLookupError(f"{type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise ProfileLookupError(f"HTTP {response.status_code}")
        try:
            profile = response.json()
        except ValueError:
            raise ProfileLookupError("response is not JSON") from None
        if not isinstance(profile, dict):
            raise ProfileLookupError("response is not a JSON object")
        return profile

    async def aclose(self) -> None:
        await self._client.aclose()


class CallableProfiles:
    """Profiles from a function `f(user_id)`, sync (keep it fast) or async."""

    def __init__(self, function: Any) -> None:
        if not callable(function):
            raise TypeError(f"{function!r} is not callable")
        self.function = function

    async def get(self, user_id: str) -> Any:
        result = self.function(user_id)
        if inspect.isawaitable(result):
            result = await result
        return result


def load_callable(spec: str) -> ProfileSource:
    """`package.module:name`: a function, or an object with `async get(user_id)`."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected \"module:function\", got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r}: {exc}") from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if (
        callable(getattr(target, "get", None))
        and not inspect.isfunction(target)
        and not inspect.isclass(target)
    ):
        return target  # type: ignore[no-any-return]
    if not callable(target):
        raise ValueError(f"{spec!r} is neither callable nor has a get(user_id) method")
    return CallableProfiles(target)
