"""The embedding API: Verdant's blueprint inside someone else's Quart-Trio app."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio
from trio_websocket import HandshakeError, open_websocket_url

from verdant_trio import LocalFileStorage, TokenProvider, create_verdant
from verdant_trio.client import connect, timestamp

pytestmark = pytest.mark.trio
SECRET = "embedding-secret-embedding-secret"


class Profiles:
    async def get(self, user_id: str) -> dict[str, str]:
        return {"id": user_id, "name": user_id.title()}


async def test_blueprint_serves_sync_files_and_the_apps_own_routes(tmp_path: Path) -> None:
    files = LocalFileStorage(tmp_path / "files")
    verdant = create_verdant(
        storage=tmp_path / "dbs", token_secret=SECRET, profiles=Profiles(), file_storage=files
    )
    app = QuartTrio(__name__)
    app.register_blueprint(verdant.blueprint(), url_prefix="/api/sync")
    app.register_blueprint(verdant.files_blueprint())
    verdant.init_app(app)
    tokens = TokenProvider(SECRET)

    @app.get("/auth/<library_id>")
    async def auth(library_id: str) -> dict[str, str]:
        user = request.args["user"]  # your app authenticates here
        return {"accessToken": tokens.get_token(library_id, user, request.host_url + "api/sync")}

    config = Config()
    config.bind = ["127.0.0.1:0"]
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
        base = binds[0]
        async with httpx.AsyncClient(base_url=base) as http:
            token = (await http.get("/auth/lib", params={"user": "alice"})).json()["accessToken"]
            bob_token = (await http.get("/auth/lib", params={"user": "bob"})).json()["accessToken"]
            with trio.fail_after(20):
                async with connect(base + "/api/sync", token) as alice, connect(base + "/api/sync", bob_token) as bob:
                    assert alice.subprotocol == "Bearer"
                    await alice.sync("ra")
                    await bob.sync("rb")
                    await alice.send({"type": "presence-update", "replicaId": "ra", "presence": {}})
                    changed = await bob.wait_for("presence-changed")
                    assert changed["userInfo"]["profile"] == {"id": "alice", "name": "Alice"}
                    await alice.op("ra", [{"oid": "items/1", "timestamp": timestamp(), "data": {"op": "initialize", "value": {"v": 1}}}])
                    assert (await bob.wait_for("op-re"))["operations"][0]["oid"] == "items/1"
            with pytest.raises(HandshakeError):
                async with open_websocket_url(base.replace("http", "ws") + "/api/sync", subprotocols=["Bearer", "forged"]):
                    pass
            # HTTP push/pull through the blueprint
            response = await http.post("/api/sync", json={"messages": [{"type": "heartbeat"}]}, headers={"Authorization": f"Bearer {token}"})
            assert response.json() == {"messages": [{"type": "heartbeat-response"}]}
            # files through the blueprint
            boundary = "xyzxyz"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n").encode()
            response = await http.post("/api/sync/files/f1", content=body, headers={"Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
            assert response.status_code == 200, response.text
            info = (await http.get("/api/sync/files/f1", headers={"Authorization": f"Bearer {token}"})).json()
            assert info["url"].endswith("/files/lib/f1/a.txt")
            assert (await http.get(info["url"])).content == b"hello"
        assert (await verdant.info("lib"))["operationsCount"] == 1
        shutdown.set()
