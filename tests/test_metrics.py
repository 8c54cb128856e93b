"""`/metrics`, `/healthz` and `/readyz` on a running server; the metrics parsed as Prometheus does."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from verdant_trio.client import connect, timestamp
from verdant_trio.engine.settings import CoreSettings, LibrarySettings
from verdant_trio.service.health import Health
from verdant_trio.service.metrics import PrometheusObserver
from verdant_trio.sync.decisions import encode_nonce
from verdant_trio.sync.protocol import ReplicaType

from .conftest import RunningServer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, sorted labels), through the official text parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(server: RunningServer) -> Samples:
    async with server.http() as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def until(check: Callable[[], Awaitable[Any]], timeout_s: float = 10.0) -> Any:
    """Poll a condition the server reaches on its own (nothing to await from outside)."""
    with trio.fail_after(timeout_s):
        while not (result := await check()):
            await trio.sleep(0.02)
        return result


def initialize(oid: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"oid": oid, "timestamp": timestamp(), "data": {"op": "initialize", "value": value}}


async def test_counters_move_when_messages_flow(server: RunningServer) -> None:
    before = await scrape(server)
    assert value(before, "verdant_libraries_active") == 0
    assert value(before, "verdant_build_info", version=next(
        dict(k[1])["version"] for k in before if k[0] == "verdant_build_info"
    )) == 1
    assert value(before, "process_resident_memory_bytes") > 0
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token(user="alice")) as a, connect(
            server.sync_url, server.token(user="bob", type=ReplicaType.READ_ONLY_REALTIME)
        ) as b:
            await a.sync("ra")
            await b.sync("rb")
            await a.op("ra", [initialize("items/1", {"n": 1}), initialize("items/2", {"n": 2})])
            await a.wait_for("server-ack")
            await b.wait_for("op-re")
            during = await scrape(server)
            ws = {"transport": "websocket"}
            assert value(during, "verdant_connections_open", **ws, replica_type="realtime") == 1
            assert value(during, "verdant_connections_open", **ws, replica_type="read_only_realtime") == 1
            assert value(during, "verdant_connections_total", **ws, replica_type="realtime") == 1
            assert value(during, "verdant_libraries_active") == 1
            assert value(during, "verdant_messages_received_total", type="sync") == 2
            assert value(during, "verdant_messages_received_total", type="op") == 1
            assert value(during, "verdant_messages_sent_total", type="sync-resp") == 2
            assert value(during, "verdant_messages_sent_total", type="server-ack") == 1
            assert value(during, "verdant_messages_sent_total", type="op-re") == 1
            assert value(during, "verdant_operations_stored_total") == 2
            await a.send_raw("not json")
            await a.wait_for("error")
            invalid = await scrape(server)
            assert value(invalid, "verdant_messages_received_total", type="invalid") == 1

    async def all_closed() -> Samples | None:
        samples = await scrape(server)
        open_now = sum(v for (name, _), v in samples.items() if name == "verdant_connections_open")
        return samples if open_now == 0 else None

    after = await until(all_closed)
    assert value(after, "verdant_connections_total", transport="websocket", replica_type="realtime") == 1


async def test_request_latency_is_recorded_by_route_template(server: RunningServer) -> None:
    async with server.http() as http:
        await http.get("/healthz")
        missing = await http.get("/admin/libraries/nope", headers=server.admin_headers())
        assert missing.status_code == 404
        await http.get("/no/such/route")
    samples = await scrape(server)
    count = "verdant_http_request_duration_seconds_count"
    assert value(samples, count, method="GET", route="/healthz", status="200") == 1
    # the template, not the path: library ids never become label values
    assert value(samples, count, method="GET", route="/admin/libraries/<path:library_id>", status="404") == 1
    assert value(samples, count, method="GET", route="unmatched", status="404") == 1
    bucket = "verdant_http_request_duration_seconds_bucket"
    assert value(samples, bucket, method="GET", route="/healthz", status="200", le="+Inf") == 1
    assert not any("nope" in str(labels) for _, labels in samples)


async def test_compaction_is_counted_and_timed(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token()) as a:
            await a.sync("ra")
            for n in range(3):
                await a.op("ra", [initialize(f"items/{n}", {"n": n})])
                await a.wait_for("server-ack")
            await a.send({"type": "ack", "replicaId": "ra", "nonce": encode_nonce(3)})
            await a.send({"type": "ack", "replicaId": "ra", "timestamp": timestamp()})

            async def compacted() -> Samples | None:
                samples = await scrape(server)
                return samples if value(samples, "verdant_rebases_total") >= 1 else None

            samples = await until(compacted)
    assert value(samples, "verdant_rebased_operations_total") == 2  # the newest is never folded
    assert value(samples, "verdant_rebase_duration_seconds_count") >= 1
    assert value(samples, "verdant_rebase_duration_seconds_sum") > 0


async def test_metrics_can_be_turned_off(server_factory: Any) -> None:
    async with server_factory(metrics=False) as server, server.http() as http:
        assert (await http.get("/metrics")).status_code == 404
        assert (await http.get("/healthz")).status_code == 200


async def test_openmetrics_for_scrapers_that_ask(server: RunningServer) -> None:
    async with server.http() as http:
        response = await http.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


async def test_health_and_readiness(server: RunningServer) -> None:
    async with server.http() as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ok"})
        # storage that cannot be written makes the server unready (root ignores permissions,
        # so the directory is replaced by a file)
        databases = server.settings.core.libraries.databases_dir
        shutil.rmtree(databases)
        databases.write_text("not a directory")
        with trio.fail_after(5):
            while (not_ready := await http.get("/readyz")).status_code != 503:
                await trio.sleep(0.2)  # the probe result is reused for a second
        problems = not_ready.json()["problems"]
        assert len(problems) == 1 and problems[0].startswith(f"storage not writable: {databases}")
        assert (await http.get("/healthz")).status_code == 200  # alive all the same
        databases.unlink()
        databases.mkdir()


class FakeCore:
    def __init__(self, databases_dir: Path) -> None:
        self.running = trio.Event()
        self.shutting_down = False
        self.settings = CoreSettings(LibrarySettings(databases_dir=databases_dir))


async def test_readiness_follows_the_core_and_listeners(tmp_path: Path) -> None:
    core = FakeCore(tmp_path)
    health = Health(core, [tmp_path], probe_reuse_s=0)  # type: ignore[arg-type]
    assert await health.problems() == ["the sync core is not running", "not listening yet"]
    core.running.set()
    health.listening = True
    assert await health.problems() == []
    assert await health.healthy()
    core.shutting_down = True
    assert await health.problems() == ["shutting down"]
    health.storage_dirs.append(tmp_path / "gone")
    problems = await health.storage_problems()
    assert problems and "gone" in problems[0]
    assert not await health.healthy()


def test_the_observer_maps_every_core_event() -> None:
    observer = PrometheusObserver(process=False)
    observer.connection_opened("websocket", 0)
    observer.connection_opened("websocket", 4)
    observer.connection_closed("websocket", 4)
    observer.message_in("sync")
    observer.message_out("op-re", 3)
    observer.message_out("op-re", 0)
    observer.operations_stored(5)
    observer.rebase(0.25, 7)
    observer.slow_consumer()
    observer.library_opened()
    observer.library_opened()
    observer.library_closed()
    observer.upload(1000)
    observer.request_done("POST", "/verdant", 200, 0.003)
    body, content_type = observer.render()
    assert content_type.startswith("text/plain")
    s = parse(body.decode())
    assert value(s, "verdant_connections_open", transport="websocket", replica_type="realtime") == 1
    assert value(s, "verdant_connections_open", transport="websocket", replica_type="read_only_pull") == 0
    assert value(s, "verdant_messages_received_total", type="sync") == 1
    assert value(s, "verdant_messages_sent_total", type="op-re") == 3
    assert value(s, "verdant_operations_stored_total") == 5
    assert value(s, "verdant_rebases_total") == 1
    assert value(s, "verdant_rebased_operations_total") == 7
    assert value(s, "verdant_rebase_duration_seconds_sum") == 0.25
    assert value(s, "verdant_rebase_duration_seconds_bucket", le="0.25") == 1
    assert value(s, "verdant_slow_consumer_disconnects_total") == 1
    assert value(s, "verdant_libraries_active") == 1
    assert value(s, "verdant_upload_bytes_total") == 1000
    assert value(s, "verdant_uploads_total") == 1
    assert value(
        s, "verdant_http_request_duration_seconds_count", method="POST", route="/verdant", status="200"
    ) == 1
    assert not any(name.startswith("process_") for name, _ in s)
    # two observers (two servers in one process) never share series
    assert value(parse(PrometheusObserver(process=False).render()[0].decode()), "verdant_rebases_total") == 0
