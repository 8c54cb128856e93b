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

import logging
from collections import OrderedDict
from typing import Any, Protocol

import trio

log = logging.getLogger(__name__)

class ProfileSource(Protocol):
    async def get(self, user_id: str) -> Any: ...


class ProfileLookupError(Exception):
    """The source answered, but not with a profile (the cache falls back to `{"id": ...}`)."""


class DefaultProfiles:
    """The quickstart's profiles: just the user id."""

    async def get(self, user_id: str) -> Any:
        return {"id": user_id}


class CachedProfiles:
    """A source behind a TTL cache, with a timeout and the `{"id": user_id}` fallback."""

    def __init__(
        self,
        source: ProfileSource,
        *,
        ttl_s: float = 300.0,
        timeout_s: float = 2.0,
        max_entries: int = 10_000,
    ) -> None:
        self._source = source
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    @property
    def source(self) -> ProfileSource:
        return self._source

    async def get(self, user_id: str) -> Any:
        now = trio.current_time()
        hit = self._cache.get(user_id)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(user_id)
            return hit[1]
        profile: Any = None
        with trio.move_on_after(self._timeout_s) as scope:
            try:
                profile = await self._source.get(user_id)
            except Exception as exc:  # a profile service problem must not refuse a sync
                log.warning("profile lookup failed user=%s error=%s", user_id, exc)
        if scope.cancelled_caught:
            log.warning("profile lookup timed out user=%s timeout_s=%s", user_id, self._timeout_s)
        if profile is None:
            profile = {"id": user_id}
            expires = now + min(self._ttl_s, 30.0)  # retry a failed lookup soon
        else:
            expires = now + self._ttl_s
        self._cache[user_id] = (expires, profile)
        self._cache.move_to_end(user_id)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return profile

    def evict(self, user_id: str) -> None:
        self._cache.pop(user_id, None)

    def reconfigure(
        self,
        source: ProfileSource | None = None,
        *,
        ttl_s: float | None = None,
        timeout_s: float | None = None,
        max_entries: int | None = None,
    ) -> ProfileSource:
        """Swap the source and limits (SIGHUP); the cache is emptied. Returns the old source,
        for the caller to close once in-flight lookups are done with it."""
        old = self._source
        if source is not None:
            self._source = source
        if ttl_s is not None:
            self._ttl_s = ttl_s
        if timeout_s is not None:
            self._timeout_s = timeout_s
        if max_entries is not None:
            self._max = max_entries
        self._cache.clear()
        return old
