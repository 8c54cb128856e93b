"""Refusals real clients can read: the lingering close, and hypercorn's close kept off the socket.

A refusal sent before the request's body has arrived (413, 401, 400) must reach clients that
write their whole body before they read: Node's fetch, urllib and httpx each upload 101 MiB to
the daemon and must get the answer, as curl (which reads while it sends) always did. What a
client sends after the answer is drained within `[limits] linger_*`: a client that never stops
is cut off at the bound, and the server keeps serving everyone else meanwhile.

The rest is the seam between hypercorn and our socket (`listeners.ReplayStream`): hypercorn's
close, which takes no send lock and may run in a task Quart cancels, must neither race a send
in progress nor be skipped.
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from verdant_trio.client import connect
from verdant_trio.sync.errors import ErrorCode
from verdant_trio.transport.linger import lingering_close
from verdant_trio.transport.listeners import ReplayStream
from verdant_trio.transport.settings import LingerSettings

from .interop.harness import NODE_DIR, node_binary
from .procserver import ServerProcess

MiB = 1024 * 1024
UPLOAD_BYTES = 101 * MiB
"""Past the default `max_upload_bytes` (100 MiB): refused from its Content-Length, before any
of the body is read, so all of it must be drained for a write-first client to see the 413."""
BOUNDARY = "lingerboundary0123456789"
FORM_HEAD = (
    f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n"
    "Content-Type: application/octet-stream\r\n\r\n"
).encode()
FORM_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()
ZEROS = bytes(MiB)


def form_chunks(size: int) -> Iterator[bytes]:
    """A multipart body with a `size`-byte file of zeros, a MiB at a time."""
    yield FORM_HEAD
    for start in range(0, size, MiB):
        yield ZEROS[: min(MiB, size - start)]
    yield FORM_TAIL


def form_length(size: int) -> int:
    return len(FORM_HEAD) + size + len(FORM_TAIL)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The daemon with its default limits (the lingering bounds must suit real clients)."""
    process = ServerProcess(tmp_path_factory.mktemp("refusals"))
    process.start_blocking()
    try:
        yield process
    finally:
        process.stop_blocking()
    tracebacks = [line for line in process.log().splitlines() if "Traceback" in line]
    assert not tracebacks, "\n".join(tracebacks)[-5000:]


def answer(status: int, body: str) -> tuple[int, int | None]:
    try:
        code = json.loads(body).get("code")
    except ValueError:
        code = None
    return status, code


# -- each real client gets its answer ---------------------------------------------------------


async def node_fetch(url: str, token: str) -> tuple[int, int | None]:
    node = shutil.which(node_binary())
    assert node, f"`{node_binary()}` (Node.js >= 20) is not on PATH: this test needs it"
    result = await trio.run_process(
        [node, str(NODE_DIR / "fetch_upload.mjs"), url, token, str(UPLOAD_BYTES)],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    out = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert "status" in out, f"fetch got no answer: {out} {result.stderr.decode()[-500:]}"
    return answer(out["status"], out["body"])


def _urllib_upload(url: str, token: str) -> tuple[int, int | None]:
    request = urllib.request.Request(
        url, data=form_chunks(UPLOAD_BYTES), method="POST",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Content-Length": str(form_length(UPLOAD_BYTES)),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return answer(response.status, response.read().decode())
    except urllib.error.HTTPError as error:
        return answer(error.code, error.read().decode())


async def urllib_upload(url: str, token: str) -> tuple[int, int | None]:
    return await trio.to_thread.run_sync(_urllib_upload, url, token)


async def httpx_upload(url: str, token: str) -> tuple[int, int | None]:
    async def body() -> AsyncIterator[bytes]:
        for chunk in form_chunks(UPLOAD_BYTES):
            yield chunk

    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            url, content=body(),
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                "Content-Length": str(form_length(UPLOAD_BYTES)),
            },
        )
    return answer(response.status_code, response.text)


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # no 101 MiB written to disk
    return path


async def curl_upload(url: str, token: str, tmp_path: Path) -> tuple[int, int | None]:
    curl = shutil.which("curl")
    assert curl, "curl is not on PATH: this test needs it (it is not skipped)"
    path = await trio.to_thread.run_sync(sparse_file, tmp_path / "big.bin", UPLOAD_BYTES)
    result = await trio.run_process(
        [curl, "-sS", "-o", str(tmp_path / "answer"), "-w", "%{http_code}",
         "-H", f"Authorization: Bearer {token}", "-F", f"file=@{path}", url],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return answer(int(result.stdout), (tmp_path / "answer").read_text())


@pytest.mark.trio
@pytest.mark.parametrize("client", ["node fetch", "urllib", "httpx", "curl"])
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("too large", (413, ErrorCode.PAYLOAD_TOO_LARGE)),
        ("bad token", (401, ErrorCode.INVALID_TOKEN)),
    ],
)
async def test_every_client_reads_the_refusal_of_a_101_mib_upload(
    server: ServerProcess, tmp_path: Path, client: str, case: str, expected: tuple[int, int]
) -> None:
    url = f"{server.sync_url}/files/big-{case.replace(' ', '-')}"
    token = server.token("refusals", "alice") if case == "too large" else "not.a.token"
    with trio.fail_after(120):
        if client == "node fetch":
            received = await node_fetch(url, token)
        elif client == "urllib":
            received = await urllib_upload(url, token)
        elif client == "httpx":
            received = await httpx_upload(url, token)
        else:
            received = await curl_upload(url, token, tmp_path)
    assert received == expected


# -- hypercorn's close against the socket, through a real server ------------------------------


@pytest.mark.trio
async def test_a_client_leaving_after_the_refusals_head_is_no_server_error(
    server: ServerProcess,
) -> None:
    """The CI failure: a client reads the head of its 401 and closes with its body unsent; the
    server's reader task hears the end of stream and runs hypercorn's close while the app task
    sends the 401's body (`BusyResourceError`, logged as "Error in ASGI Framework"). Before the
    fix about one attempt in four hit it on an idle machine."""
    before = server.log().count("Error in ASGI Framework")
    with trio.fail_after(60):
        for _ in range(100):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(
                    b"POST /verdant HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer x.y.z\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 16\r\n\r\n"
                )
                first = await stream.receive_some(65536)
            assert first.startswith(b"HTTP/1.1 401"), first[:100]
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            assert (await http.get("/healthz")).status_code == 200
    assert server.log().count("Error in ASGI Framework") == before, server.log()[-3000:]


# -- the bounds -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Bytes and quiet time bounded tightly, the total time not (60 s): whatever closes a
    connection within a test's `fail_after` is one of the tight bounds."""
    process = ServerProcess(
        tmp_path_factory.mktemp("tight"),
        limits={"linger_timeout_s": 60, "linger_read_timeout_s": 1, "linger_max_bytes": 8 * MiB},
    )
    process.start_blocking()
    try:
        yield process
    finally:
        process.stop_blocking()


@pytest.fixture(scope="module")
def brief(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Only the total time bounded tightly (3 s); bytes practically not."""
    process = ServerProcess(
        tmp_path_factory.mktemp("brief"),
        limits={"linger_timeout_s": 3, "linger_max_bytes": 1 << 50},
    )
    process.start_blocking()
    try:
        yield process
    finally:
        process.stop_blocking()


async def refused_upload(port: int, path: str) -> tuple[trio.SocketStream, bytes]:
    """A POST with a bad token announcing an endless body; returns once the refusal's head is
    read (the body is not sent yet)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer x.y.z\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {1 << 50}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed before the refusal: {head!r}"
        head += chunk
    return stream, head


class Flood:
    """Sends zeros as fast as the server takes them until the connection breaks."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sent = 0
        self.cut = trio.Event()
        """Set when a send failed: the server closed (reset) the connection."""

    async def run(self) -> None:
        chunk = bytes(64 * 1024)
        try:
            while True:
                await self.stream.send_all(chunk)
                self.sent += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.cut.set()


def cut_offs(server: ServerProcess, reason: str) -> int:
    return server.log().count(f"reason={reason} discarded_bytes=")


async def wait_for_cut_off(server: ServerProcess, reason: str, before: int) -> None:
    """Until the server logs one more lingering close cut short for `reason`."""
    with trio.fail_after(20):
        while cut_offs(server, reason) == before:
            await trio.sleep(0.05)


@pytest.mark.trio
@pytest.mark.parametrize("path", ["/verdant", "/verdant/files/f"], ids=["http sync", "upload"])
async def test_a_client_that_never_stops_sending_is_cut_off_at_the_byte_bound(
    tight: ServerProcess, path: str
) -> None:
    """Through Quart (HTTP sync) and the ASGI upload path. Before, the HTTP sync refusal read
    the body for as long as the client sent (20 GB in 40 s), the upload refusal reset at once."""
    before = cut_offs(tight, "bytes")
    with trio.fail_after(30):  # the total bound is 60 s
        stream, head = await refused_upload(tight.port, path)
        assert head.startswith(b"HTTP/1.1 401"), head[:100]
        flood = Flood(stream)
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(flood.run)
            await flood.cut.wait()
        await wait_for_cut_off(tight, "bytes", before)
    assert flood.sent >= 8 * MiB


@pytest.mark.trio
async def test_a_client_that_goes_quiet_is_closed_after_the_read_timeout(
    tight: ServerProcess,
) -> None:
    before = cut_offs(tight, "quiet")
    with trio.fail_after(30):  # the total bound is 60 s: only the 1 s read timeout ends it
        stream, head = await refused_upload(tight.port, "/verdant/files/f")
        async with stream:
            await stream.send_all(bytes(1000))
            rest = head
            while chunk := await stream.receive_some(65536):  # the answer's body, then our FIN
                rest += chunk
            await wait_for_cut_off(tight, "quiet", before)  # our socket is still open
    assert rest.startswith(b"HTTP/1.1 401") and rest.endswith(b"}"), rest[-200:]


@pytest.mark.trio
async def test_the_server_keeps_serving_while_a_flood_is_drained_until_the_time_bound(
    brief: ServerProcess,
) -> None:
    served: list[str] = []
    before = cut_offs(brief, "time")
    with trio.fail_after(60):
        stream, head = await refused_upload(brief.port, "/verdant")
        assert head.startswith(b"HTTP/1.1 401"), head[:100]
        flood = Flood(stream)
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(flood.run)
            async with httpx.AsyncClient(base_url=brief.url, timeout=10) as http:
                while not flood.cut.is_set():
                    sent_before = flood.sent
                    with trio.fail_after(2):
                        assert (await http.get("/healthz")).status_code == 200
                        async with connect(brief.sync_url, brief.token("busy", "bob")) as client:
                            assert (await client.sync("replica-bob"))["type"] == "sync-resp"
                    if flood.sent > sent_before and not flood.cut.is_set():
                        served.append("while draining")  # the flood was being read meanwhile
            await flood.cut.wait()
        await wait_for_cut_off(brief, "time", before)
    assert len(served) >= 3, served


# -- the seam, over a socket pair -------------------------------------------------------------


async def hypercorn_close(stream: ReplayStream) -> None:
    """What hypercorn's `TCPServer._close` does, without its send lock."""
    try:
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError):
        pass
    await stream.aclose()


@pytest.mark.trio
async def test_hypercorns_close_never_meets_a_send_in_progress() -> None:
    """Trio's `send_eof` holds the send conflict detector across a checkpoint: a response part
    sent then failed with `BusyResourceError`, or the close cut a send in progress. Trio runs
    the two tasks in either order, so 50 rounds meet both."""
    for _ in range(50):
        ours, theirs = trio.socket.socketpair()
        stream, peer = trio.SocketStream(ours), trio.SocketStream(theirs)
        replay = ReplayStream(stream, b"")
        lock = trio.Lock()

        async def respond(replay: ReplayStream = replay, lock: trio.Lock = lock) -> None:
            for part in (b"head;", b"body"):  # `TCPServer.protocol_send`, part by part
                async with lock:
                    try:
                        await replay.send_all(part)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return  # hypercorn's "the connection closed"

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(respond)
                nursery.start_soon(hypercorn_close, replay)
            assert stream.socket.fileno() != -1  # the socket is still ours to close
            await stream.aclose()
            received = b""
            while chunk := await peer.receive_some(100):
                received += chunk
            await peer.aclose()
        assert b"head;body".startswith(received), received


@pytest.mark.trio
async def test_hypercorns_close_in_a_cancelled_task_still_ends_its_reader() -> None:
    """Quart cancels the task that sent its response, which is where hypercorn then closes a
    `Connection: close` connection; the close must still wake hypercorn's reader."""
    ours, theirs = trio.socket.socketpair()
    stream, peer = trio.SocketStream(ours), trio.SocketStream(theirs)
    replay = ReplayStream(stream, b"")
    outcome: list[str] = []

    async def reader() -> None:
        try:
            await replay.receive_some(1024)
        except trio.ClosedResourceError:
            outcome.append("closed")

    with trio.fail_after(5):
        async with stream, peer, trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            with trio.CancelScope() as cancelled:
                cancelled.cancel()
                await hypercorn_close(replay)
    assert outcome == ["closed"]
    assert replay.half_closed and not replay.peer_ended


@pytest.mark.trio
async def test_lingering_close_stops_at_the_total_time_bound(caplog: pytest.LogCaptureFixture) -> None:
    """A client that trickles (never quiet for a read timeout, never many bytes) is closed at
    `timeout_s`; before that, it got our FIN."""
    ours, theirs = trio.socket.socketpair()
    stream, peer = trio.SocketStream(ours), trio.SocketStream(theirs)
    settings = LingerSettings(timeout_s=0.5, read_timeout_s=5, max_bytes=MiB)

    async def trickle() -> None:
        assert await peer.receive_some(10) == b""  # the FIN comes first
        try:
            while True:
                await peer.send_all(b"x")
                await trio.sleep(0.02)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    caplog.set_level(logging.INFO, "verdant_trio.transport.linger")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            await lingering_close(stream, settings, "peer")
            await stream.aclose()
    await peer.aclose()
    assert "reason=time" in caplog.text


@pytest.mark.trio
async def test_lingering_close_ends_as_soon_as_the_client_closes(caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = trio.socket.socketpair()
    stream, peer = trio.SocketStream(ours), trio.SocketStream(theirs)
    caplog.set_level(logging.INFO, "verdant_trio.transport.linger")

    async def client() -> None:
        await peer.send_all(bytes(300 * 1024))
        assert await peer.receive_some(10) == b""
        await peer.aclose()

    with trio.fail_after(5):  # the bounds are 30 s: only the client's close ends it this soon
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await lingering_close(stream, LingerSettings(), "peer")
    await stream.aclose()
    assert "cut short" not in caplog.text

