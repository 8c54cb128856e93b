"""Profile sources for presence: the app's HTTP endpoint, a Python callable, the cache around them."""

from __future__ import annotations

import sys
import types
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from verdant_trio.client import connect
from verdant_trio.engine.profiles import (
    CachedProfiles,
    DefaultProfiles,
    ProfileLookupError,
)
from verdant_trio.service.config import ProfilesSettings
from verdant_trio.service.daemon import profile_source
from verdant_trio.service.profiles import CallableProfiles, HttpProfiles, load_callable

from .conftest import RunningServer


def mock_profiles(handler: Any) -> HttpProfiles:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return HttpProfiles("https://app.internal/profiles/{user_id}?v=1", client=client)


async def test_http_source_fetches_json_objects_and_refuses_anything_else() -> None:
    seen: list[str] = []

    def app(req: httpx.Request) -> httpx.Response:
        seen.append(str(req.url))
        user = req.url.path.rsplit("/", 1)[1]
        if user == "ann":
            return httpx.Response(200, json={"id": "ann", "name": "Ann"})
        if user == "list":
            return httpx.Response(200, json=["not", "an", "object"])
        if user == "html":
            return httpx.Response(200, text="<html>")
        return httpx.Response(404, json={"error": "no such user"})

    source = mock_profiles(app)
    assert await source.get("ann") == {"id": "ann", "name": "Ann"}
    for user, problem in (("list", "not a JSON object"), ("html", "not JSON"), ("zed", "HTTP 404")):
        with pytest.raises(ProfileLookupError, match=problem):
            await source.get(user)
    with pytest.raises(ProfileLookupError):
        await source.get("a/b c?")
    assert seen[-1] == "https://app.internal/profiles/a%2Fb%20c%3F?v=1"  # one path segment
    await source.aclose()


async def test_cache_reuses_profiles_for_their_ttl_and_falls_back_to_the_id(autojump_clock: Any) -> None:
    calls: list[str] = []

    class Flaky:
        async def get(self, user_id: str) -> Any:
            calls.append(user_id)
            if user_id == "slow":
                await trio.sleep(10)
            if user_id == "broken":
                raise ProfileLookupError("HTTP 500")
            return {"id": user_id, "n": len(calls)}

    cache = CachedProfiles(Flaky(), ttl_s=60, timeout_s=1)
    assert await cache.get("ann") == {"id": "ann", "n": 1}
    assert await cache.get("ann") == {"id": "ann", "n": 1}  # cached
    await trio.sleep(61)
    assert await cache.get("ann") == {"id": "ann", "n": 2}  # expired, fetched again
    assert await cache.get("broken") == {"id": "broken"}
    assert await cache.get("slow") == {"id": "slow"}  # bounded by the timeout
    assert trio.current_time() < 70
    # failures are retried after at most 30 s, not after the full TTL
    await trio.sleep(31)
    assert await cache.get("broken") == {"id": "broken"}
    assert calls.count("broken") == 2


async def test_cache_reconfigure_swaps_the_source_and_forgets() -> None:
    cache = CachedProfiles(DefaultProfiles())
    assert await cache.get("ann") == {"id": "ann"}
    old = cache.reconfigure(CallableProfiles(lambda user: {"id": user, "v": 2}), ttl_s=5)
    assert isinstance(old, DefaultProfiles)
    assert await cache.get("ann") == {"id": "ann", "v": 2}


async def test_callables_sync_async_and_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("profile_plugins")

    def sync_profile(user_id: str) -> dict[str, str]:
        return {"id": user_id, "kind": "sync"}

    async def async_profile(user_id: str) -> dict[str, str]:
        await trio.lowlevel.checkpoint()
        return {"id": user_id, "kind": "async"}

    class Directory:
        async def get(self, user_id: str) -> dict[str, str]:
            return {"id": user_id, "kind": "object"}

    module.sync_profile = sync_profile  # type: ignore[attr-defined]
    module.async_profile = async_profile  # type: ignore[attr-defined]
    module.directory = Directory()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "profile_plugins", module)
    for name in ("sync_profile", "async_profile", "directory"):
        source = load_callable(f"profile_plugins:{name}")
        assert (await source.get("ann"))["kind"] == name.split("_")[0].replace("directory", "object")
    for spec, problem in (
        ("profile_plugins", 'expected "module:function"'),
        ("profile_plugins:missing", "has no attribute 'missing'"),
        ("no_such_module_y:get", "cannot import module"),
    ):
        with pytest.raises(ValueError, match=problem):
            load_callable(spec)


def test_the_configured_source() -> None:
    assert isinstance(profile_source(ProfilesSettings()), DefaultProfiles)
    assert isinstance(profile_source(ProfilesSettings(callable="json:loads")), CallableProfiles)
    http = profile_source(ProfilesSettings(url="https://app/{user_id}"))
    assert isinstance(http, HttpProfiles)
    trio.run(http.aclose)


async def test_presence_shows_the_apps_profiles(server_factory: Any, tmp_path: Path) -> None:
    """The daemon with `[profiles] url`: what the app's endpoint says is what peers see."""
    app = QuartTrio("profiles")
    requests: list[tuple[str, str | None]] = []

    @app.get("/profiles/<user_id>")
    async def profile(user_id: str) -> Any:
        requests.append((user_id, request.headers.get("Authorization")))
        if request.headers.get("Authorization") != "Bearer internal-secret-token":
            return Response("no", status=401)
        if user_id == "carol":
            return Response("boom", status=500)
        return {"id": user_id, "name": user_id.title(), "avatar": f"/{user_id}.png"}

    config = Config()
    config.bind = ["127.0.0.1:0"]
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config))  # type: ignore[arg-type]
        settings = ProfilesSettings(
            url=binds[0] + "/profiles/{user_id}",
            headers={"Authorization": "Bearer internal-secret-token"},
        )
        async with server_factory(profile_settings=settings) as server:
            await presence_round(server)
        nursery.cancel_scope.cancel()
    assert ("alice", "Bearer internal-secret-token") in requests
    assert [user for user, _ in requests].count("alice") == 1  # cached after the first lookup


async def presence_round(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token(user="alice")) as alice, connect(
            server.sync_url, server.token(user="bob")
        ) as bob, connect(server.sync_url, server.token(user="carol")) as carol:
            await alice.sync("ra")
            await bob.sync("rb")
            await carol.sync("rc")
            await alice.send({"type": "presence-update", "replicaId": "ra", "presence": {"x": 1}})
            changed = await bob.wait_for("presence-changed")
            assert changed["userInfo"]["profile"] == {"id": "alice", "name": "Alice", "avatar": "/alice.png"}
            await carol.send({"type": "presence-update", "replicaId": "rc", "presence": {}})
            changed = await bob.wait_for(
                lambda m: m.get("type") == "presence-changed" and m["replicaId"] == "rc"
            )
            assert changed["userInfo"]["profile"] == {"id": "carol"}  # the app failed: fallback
