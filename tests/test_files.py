"""File uploads, file infos, serving and clean-up over HTTP."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel

from verdant_trio.client import connect, timestamp
from verdant_trio.engine.library import LibraryHost
from verdant_trio.sync.protocol import ReplicaType

from .conftest import RunningServer

pytestmark = pytest.mark.trio
BOUNDARY = "----verdanttrioboundary7MA4YWxkTrZu0gW"


def form_head(filename: str, content_type: str) -> bytes:
    return (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode("utf-8", "surrogateescape")


FORM_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def form(filename: str, data: bytes, content_type: str = "application/octet-stream") -> bytes:
    return form_head(filename, content_type) + data + FORM_TAIL


def upload_headers(token: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
    }


async def upload(server: RunningServer, file_id: str, body: Any, token: str | None = None) -> httpx.Response:
    async with server.http() as http:
        return await http.post(
            f"/verdant/files/{file_id}", content=body, headers=upload_headers(token or server.token())
        )


async def file_info(server: RunningServer, file_id: str, token: str | None = None) -> httpx.Response:
    async with server.http() as http:
        return await http.get(
            f"/verdant/files/{file_id}", headers={"Authorization": f"Bearer {token or server.token()}"}
        )


def stored_files(server: RunningServer) -> list[Path]:
    root = server.data_dir / "files"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def test_upload_then_info_then_download(server: RunningServer) -> None:
    data = os.urandom(300_000)
    response = await upload(server, "f-1", form("photo.png", data, "image/png"))
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True}
    info = (await file_info(server, "f-1")).json()
    assert info["id"] == "f-1" and info["name"] == "photo.png" and info["type"] == "image/png"
    assert info["libraryId"] == "lib"
    assert info["url"] == f"{server.url}/files/lib/f-1/photo.png"
    async with server.http() as http:
        served = await http.get(info["url"])
    assert served.status_code == 200
    assert served.content == data
    assert served.headers["content-type"] == "image/png"
    assert served.headers["x-content-type-options"] == "nosniff"
    assert "etag" in served.headers and "last-modified" in served.headers


async def test_a_file_gone_from_disk_is_404_and_one_deleted_while_sent_arrives_whole(
    server: RunningServer,
) -> None:
    """A library's files are deleted when it is evicted or compacts: a download that learned
    the file's type just before must answer 404, not fail inside a 200."""
    data = os.urandom(2_000_000)
    await upload(server, "doomed", form("big.bin", data))
    await upload(server, "gone", form("small.bin", b"x" * 10))
    urls = {f: (await file_info(server, f)).json()["url"] for f in ("doomed", "gone")}
    (gone,) = [p for p in stored_files(server) if p.name == "small.bin"]
    gone.unlink()  # its metadata stays: as if deleted between the lookup and the open
    async with server.http() as http:
        missing = await http.get(urls["gone"])
        assert missing.status_code == 404, missing.text
        async with http.stream("GET", urls["doomed"]) as streaming:
            assert streaming.status_code == 200
            chunks = []
            async for chunk in streaming.aiter_bytes():
                if not chunks:
                    (doomed,) = [p for p in stored_files(server) if p.name == "big.bin"]
                    doomed.unlink()  # deleted while it is being sent
                chunks.append(chunk)
            assert not any(p.name == "big.bin" for p in stored_files(server))
    assert b"".join(chunks) == data


async def test_range_and_conditional_requests(server: RunningServer) -> None:
    data = bytes(range(256)) * 4000
    await upload(server, "video", form("clip.mp4", data, "video/mp4"))
    url = (await file_info(server, "video")).json()["url"]
    async with server.http() as http:
        partial = await http.get(url, headers={"Range": "bytes=1000-1999"})
        assert partial.status_code == 206
        assert partial.content == data[1000:2000]
        assert partial.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
        tail = await http.get(url, headers={"Range": "bytes=-100"})
        assert tail.status_code == 206 and tail.content == data[-100:]
        etag = (await http.get(url)).headers["etag"]
        assert (await http.get(url, headers={"If-None-Match": etag})).status_code == 304
        bad = await http.get(url, headers={"Range": f"bytes={len(data) + 10}-"})
        assert bad.status_code == 416


async def _stream(parts: int, size: int, seed: bytes = b"x") -> AsyncIterator[bytes]:
    yield form_head("big.bin", "application/octet-stream")
    block = hashlib.sha256(seed).digest() * (size // 32)
    for _ in range(parts):
        yield block
        await trio.lowlevel.checkpoint()
    yield FORM_TAIL


async def test_large_upload_streams_with_flat_memory(server: RunningServer) -> None:
    parts, size = 96, 256 * 1024  # 24 MiB
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline, _ = tracemalloc.get_traced_memory()
        response = await upload(server, "big", _stream(parts, size))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    (stored,) = stored_files(server)
    assert stored.stat().st_size == parts * size
    # the client side of this test holds a 256 KiB block; the server must not hold the file
    assert peak - baseline < 6 * 1024 * 1024, f"peak grew by {(peak - baseline) / 1e6:.1f} MB"


async def test_interrupted_upload_leaves_nothing(server: RunningServer) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    body_start = form_head("half.bin", "application/octet-stream") + b"y" * 200_000
    request = (
        f"POST /verdant/files/half HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {server.token()}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body_start) + 5_000_000}\r\n\r\n"
    ).encode() + body_start
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    with trio.fail_after(5):
        while not list((server.data_dir / "files").rglob(".upload-*")):
            await trio.sleep(0.01)
    await stream.aclose()
    with trio.fail_after(5):
        while stored_files(server):
            await trio.sleep(0.02)
    assert (await file_info(server, "half")).status_code == 404


async def test_oversized_upload_is_refused_with_413(server_factory: Any) -> None:
    async with server_factory(core={"max_upload_bytes": 100_000}) as server:
        response = await upload(server, "too-big", form("a.bin", b"z" * 150_000))
        assert response.status_code == 413
        assert response.json()["code"] == 4130
        # without a content length (chunked), the limit holds while streaming
        response = await upload(server, "too-big-2", _stream(8, 32 * 1024))
        assert response.status_code == 413
        assert stored_files(server) == []
        assert (await file_info(server, "too-big")).status_code == 404


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "a/b", "bad\x00name", "..", "..\\..\\win.ini"])
async def test_hostile_file_names_never_escape_the_root(server: RunningServer, hostile: str) -> None:
    response = await upload(server, "hostile", form(hostile, b"data"))
    assert response.status_code == 200, response.text
    root = (server.data_dir / "files").resolve()
    for path in stored_files(server):
        assert path.resolve().is_relative_to(root)
        assert "/" not in path.name and "\x00" not in path.name and path.name not in (".", "..")
    info = (await file_info(server, "hostile")).json()
    async with server.http() as http:
        assert (await http.get(info["url"])).content == b"data"
    assert not (server.data_dir.parent / "etc").exists()


@pytest.mark.parametrize("file_id", ["../escape", "a%2Fb", "x" * 300])
async def test_hostile_file_ids_are_encoded_or_refused(server: RunningServer, file_id: str) -> None:
    response = await upload(server, file_id, form("f.txt", b"data"))
    assert response.status_code in (200, 400, 404)
    root = (server.data_dir / "files").resolve()
    for path in stored_files(server):
        assert path.resolve().is_relative_to(root)


async def test_served_paths_cannot_traverse(server: RunningServer) -> None:
    await upload(server, "ok", form("ok.txt", b"fine", "text/plain"))
    async with server.http() as http:
        for path in ["/files/lib/ok/..%2F..%2F..%2Fetc%2Fpasswd", "/files/../dbs/lib.sqlite", "/files/lib/ok/.upload-x.part", "/files/lib/nope/ok.txt"]:
            response = await http.get(path)
            assert response.status_code in (400, 404), path


async def test_unknown_file_is_404_with_verdant_body(server: RunningServer) -> None:
    response = await file_info(server, "missing")
    assert response.status_code == 404 and response.json()["code"] == 4040
    async with server.http() as http:
        assert (await http.get("/files/lib/missing/x.png")).status_code == 404


async def test_read_only_tokens_cannot_upload(server: RunningServer) -> None:
    for kind in (ReplicaType.READ_ONLY_PULL, ReplicaType.READ_ONLY_REALTIME):
        response = await upload(server, "ro", form("a.txt", b"x"), token=server.token(type=kind))
        assert response.status_code == 403
        assert response.json()["code"] == 4030
    assert stored_files(server) == []


async def test_upload_needs_a_valid_token(server: RunningServer) -> None:
    async with server.http() as http:
        response = await http.post("/verdant/files/x", content=form("a.txt", b"x"), headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert response.status_code == 401 and response.json()["code"] == 4010
    response = await upload(server, "x", form("a.txt", b"x"), token="forged.token.here")
    assert response.status_code == 401 and response.json()["code"] == 4011


async def test_malformed_uploads_are_refused(server: RunningServer) -> None:
    async with server.http() as http:
        response = await http.post("/verdant/files/x", content=b"plain", headers={"Authorization": f"Bearer {server.token()}", "Content-Type": "text/plain"})
        assert response.status_code == 400
        response = await http.post("/verdant/files/x", content=b"--nope\r\n", headers=upload_headers(server.token()))
        assert response.status_code == 400
    assert stored_files(server) == []


async def test_active_content_downloads_as_attachment(server: RunningServer) -> None:
    await upload(server, "page", form("evil.html", b"<script>alert(1)</script>", "text/html"))
    url = (await file_info(server, "page")).json()["url"]
    async with server.http() as http:
        response = await http.get(url)
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-disposition"].startswith("attachment")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in response.headers["content-security-policy"]


async def test_reupload_replaces_and_clears_pending_delete(server: RunningServer) -> None:
    await upload(server, "same", form("one.txt", b"1", "text/plain"))
    await upload(server, "same", form("two.txt", b"22", "text/plain"))
    assert [p.name for p in stored_files(server)] == ["two.txt"]
    assert (await file_info(server, "same")).json()["name"] == "two.txt"


async def test_evicting_a_library_deletes_its_files(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token()) as client:
        await client.sync("r1", operations=[{"oid": "items/1", "timestamp": timestamp(), "data": {"op": "initialize", "value": {}}}])
    await upload(server, "doomed", form("d.txt", b"bye", "text/plain"))
    assert stored_files(server)
    async with server.http() as http:
        response = await http.post("/admin/libraries/lib/evict", headers=server.admin_headers())
    assert response.status_code == 200
    assert stored_files(server) == []
    assert (await file_info(server, "doomed")).status_code == 404


async def test_unreferenced_files_are_deleted_when_everyone_leaves(server_factory: Any) -> None:
    """Compaction marks the file; it stays while anyone is connected, even when someone else
    leaves, and goes once the last one has left."""
    async with server_factory(libraries={"file_expiration_days": 0, "rebase_interval_s": 0.05}) as server:
        await upload(server, "pic", form("pic.png", b"png-bytes", "image/png"))
        file_ref = {"@@type": "file", "id": "pic"}
        async with connect(server.sync_url, server.token(user="alice")) as client:
            await client.sync("ra")
            t1 = timestamp()
            await client.op("ra", [{"oid": "items/1", "timestamp": t1, "data": {"op": "initialize", "value": {"image": file_ref}}}])
            await client.wait_for("server-ack")
            t2 = timestamp()
            await client.op("ra", [{"oid": "items/1", "timestamp": t2, "data": {"op": "delete"}}])
            await client.wait_for("server-ack")
            t3 = timestamp()
            await client.op("ra", [{"oid": "items/2", "timestamp": t3, "data": {"op": "initialize", "value": {}}}])
            await client.wait_for("server-ack")
            await client.send({"type": "ack", "replicaId": "ra", "timestamp": timestamp()})
            host = server.core.libraries.active["lib"]
            # The clean-up is started by the library's `on_empty` hook, called synchronously
            # when the last peer is gone: recording it makes "not yet" observable.
            clean_ups: list[int] = []
            start_clean_up = host.on_empty
            assert start_clean_up is not None

            def recording(emptied: LibraryHost) -> None:
                clean_ups.append(len(emptied.core.peers) if emptied.core else -1)
                start_clean_up(emptied)

            host.on_empty = recording

            async def marked() -> bool:
                row = await host.call(lambda core: core.shard.file("pic"))
                return row is not None and row.pending_delete_at_ms is not None

            with trio.fail_after(10):  # compaction folds items/1 and marks its file
                while not await marked():
                    await trio.sleep(0.02)
            # bob comes and goes while alice stays: his departure is where a clean-up would start
            async with connect(server.sync_url, server.token(user="bob")) as bob:
                await bob.send({"type": "presence-update", "replicaId": "rb", "presence": {}})
                await bob.wait_for("presence-changed")
            offline = await client.wait_for(lambda m: m["type"] == "presence-offline" and m["userId"] == "bob")
            assert offline["replicaId"] == "rb"
            assert clean_ups == []
            assert stored_files(server)  # referenced by nobody, but people are here
            assert (await file_info(server, "pic")).status_code == 200
        with trio.fail_after(10):
            while stored_files(server):
                await trio.sleep(0.05)
        assert clean_ups == [0]
        assert (await file_info(server, "pic")).status_code == 404
