"""The embedding example (`examples/embedded_app.py`) with real Verdant clients.

The app is started as its README says (`python examples/embedded_app.py --port N`); clients get
their tokens from the app's own `/auth/<library>` route and sync through the blueprint it mounts
under `/sync`: one over the websocket, one by HTTP pull, with presence profiles from the app and
a file between them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .harness import NodeClient, converged, free_port, gather, start_server

pytestmark = pytest.mark.interop

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "embedded_app.py"
SECRET = "embedded-example-secret-0123456789abcdef"


async def test_two_real_clients_sync_through_the_embedded_example(
    tmp_path: Path, interop_log_dir: Path
) -> None:
    port = free_port()
    server = await start_server(
        [sys.executable, str(EXAMPLE), "--port", str(port), "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path / "server",
        port=port,
        env={"VERDANT_TOKEN_SECRET": SECRET},
        ready_path="/healthz",
    )
    clients: list[NodeClient] = []
    try:
        base = server.base_url
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await http.get("/auth/family")).status_code == 401
                assert (await http.get("/auth/bob-notes?session=alice-session")).status_code == 403
                assert (await http.get("/readyz")).json() == {"status": "ok"}

        def open_client(name: str, transport: str) -> Any:
            return lambda: NodeClient.open(
                name=name,
                log_dir=interop_log_dir,
                auth_endpoint=f"{base}/auth/family?session={name}-session",
                transport=transport,
                initial_presence={"cursor": 0},
            )

        alice, bob = await gather(open_client("alice", "realtime"), open_client("bob", "pull"))
        clients += [alice, bob]

        await alice.put("items", {"id": "milk", "content": "milk", "tags": ["dairy"]})
        await bob.put("categories", {"id": "food", "name": "food"})
        await bob.wait_until(lambda: bob.get("items", "milk"), message="bob gets alice's item")
        await bob.update("items", "milk", set={"purchased": True})
        items = await converged([alice, bob], "items")
        assert items[0]["content"] == "milk" and items[0]["purchased"] is True
        assert [c["name"] for c in await converged([alice, bob], "categories")] == ["food"]

        # presence carries the profile the app's `Profiles.get` returned
        async def bob_seen() -> Any:
            return (await alice.presence())["peers"].get("bob")

        bob_peer = await alice.wait_until(bob_seen, message="alice sees bob")
        assert bob_peer["profile"] == {"id": "bob", "name": "Bob Builder"}

        # a file uploaded through the blueprint, downloaded by the other client
        payload = bytes(range(256)) * 4
        await alice.attach_file("items", "milk", "image", payload, name="milk.png", type="image/png")

        async def bob_downloads() -> bytes | None:
            info = await bob.file_info("items", "milk", "image")
            if not info or info["loading"] or not info["url"]:
                return None
            return await bob.file_content("items", "milk", "image")

        assert await bob.wait_until(bob_downloads, message="bob downloads alice's file") == payload
        for client in (alice, bob):
            assert await client.errors() == []
    finally:
        for client in clients:
            await client.aclose()
        assert await server.terminate() == 0, server.log_tail()
        (interop_log_dir / "server.log").write_bytes(server.log_path.read_bytes())
