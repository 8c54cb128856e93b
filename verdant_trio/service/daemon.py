"""The server process: the nursery tree that owns the core and the HTTP server, and its signals.

Nursery tree: `run_daemon` (signals, watchdog) → `Server.serve` → core (library tasks) →
listeners (sync sockets; hypercorn for the rest). Readiness is `task_status.started(binds)`
once the sockets listen; only then is systemd told `READY=1`.

Shutdown (SIGTERM or SIGINT) is ordered: systemd hears `STOPPING=1`; new websockets are refused
and open ones closed with 1001 "going away"; the listeners stop accepting and give requests in
flight `shutdown_timeout_s`; then the library tasks are cancelled, and each finishes the batch in
hand (its worker thread is never abandoned), checkpoints its WAL and closes its shard. A second
signal, or `shutdown_timeout_s` + `SHUTDOWN_EXTRA_S` without an end, cancels the requests at once;
the shards still close cleanly, because that part is shielded.

A cluster node with an `internal_port` also serves the node-to-node listener (`cluster.transfer`,
moving slots) in the same nursery as the node's release task: it stops taking requests at the
shutdown signal and gives those in flight the graceful timeout.

SIGHUP re-reads the config file and applies what is safe to change under load ([logging] and
[profiles]); connections are untouched. A broken file is logged and the old settings stay. A
cluster node also re-reads its placement table: slots lost are fenced at once and released
(`cluster.node`), slots gained are served; the other libraries' connections are untouched.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig

from ..engine.core import VerdantCore, open_core
from ..engine.observe import NULL_OBSERVER
from ..engine.profiles import CachedProfiles, DefaultProfiles, ProfileSource
from ..engine.registry import owns_everything
from ..storage.files import LocalFileStorage
from ..transport.app import create_asgi_app
from ..transport.listeners import Listeners
from . import logs
from .cluster.node import ClusterNode, PlacementRefused
from .cluster.placement import slot_of
from .cluster.transfer import Transfers, serve_internal
from .config import SCHEMA, ConfigError, LoadedConfig, ProfilesSettings, ServerSettings
from .health import Health, register_health
from .metrics import PrometheusObserver, RequestHooks
from .notify import SystemdNotifier
from .profiles import HttpProfiles, load_callable
from .replication.lock import DirectoryLock

log = logging.getLogger(__name__)

SHUTDOWN_EXTRA_S: Final = 5.0
"""Past the requests' grace period, how long closing the libraries may take before we cancel."""
_RELOADABLE: Final = frozenset((k.section, k.name) for k in SCHEMA if k.reloadable)


class _Config(HypercornConfig):
    """Hypercorn's config, with listening sockets that give up on stalled peers.

    A peer that stops reading leaves hypercorn's (shielded) socket write blocked forever, so
    closing a slow consumer could not free its connection. TCP_USER_TIMEOUT, inherited by every
    accepted socket, makes the kernel abort a connection whose data stays unacknowledged (zero
    window included) that long; the blocked write then fails and the connection ends.
    """

    stalled_peer_timeout_s: float = 30.0

    def create_sockets(self) -> Any:
        sockets = super().create_sockets()
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if option is not None:
            for sock in (*sockets.insecure_sockets, *sockets.secure_sockets):
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(
                        socket.IPPROTO_TCP, option, int(self.stalled_peer_timeout_s * 1000)
                    )
        return sockets


def hypercorn_config(settings: ServerSettings) -> HypercornConfig:
    config = _Config()
    config.stalled_peer_timeout_s = settings.stalled_peer_timeout_s
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.websocket_max_message_size = settings.max_message_bytes
    config.graceful_timeout = settings.graceful_timeout_s
    config.keep_alive_timeout = 75
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    return config


def profile_source(settings: ProfilesSettings) -> ProfileSource:
    if settings.url:
        return HttpProfiles(settings.url, headers=settings.headers, timeout_s=settings.timeout_s)
    if settings.callable:
        return load_callable(settings.callable)
    return DefaultProfiles()


def cached_profiles(settings: ServerSettings) -> CachedProfiles:
    """Code-given profiles (tests, embedding) win over the `[profiles]` section."""
    ps = settings.profile_settings
    return CachedProfiles(
        settings.profiles or profile_source(ps),
        ttl_s=ps.cache_ttl_s,
        timeout_s=ps.timeout_s,
        max_entries=ps.cache_max_entries,
    )


async def _close_source(source: ProfileSource, delay_s: float = 0.0) -> None:
    """Close a replaced HTTP source once lookups that already hold it have timed out."""
    if isinstance(source, HttpProfiles):
        if delay_s > 0:
            await trio.sleep(delay_s)
        with trio.CancelScope(shield=True):
            await source.aclose()


class Server:
    """One server: a core and its HTTP listeners, plus what reloads and health checks need."""

    def __init__(
        self, settings: ServerSettings, *, observer: PrometheusObserver | None = None
    ) -> None:
        self.settings = settings
        self.observer = observer or (PrometheusObserver() if settings.metrics else None)
        self.hooks = RequestHooks(self.observer, access_log=settings.logging.access_log)
        self.profiles = cached_profiles(settings)
        self.core: VerdantCore | None = None
        self.health: Health | None = None
        self._nursery: trio.Nursery | None = None
        cluster = settings.cluster
        self.cluster = (
            ClusterNode(cluster.node_id, cluster.placement, cluster.peers) if cluster else None
        )
        """This node's slots, in a cluster (None: a single server, which owns everything)."""
        self.transfers: Transfers | None = None
        """The node's side of slot moves, once its internal listener runs."""
        if self.cluster is not None and self.observer is not None:
            self.observer.track_cluster(self.cluster)

    async def serve(
        self,
        *,
        shutdown: trio.Event,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `shutdown` is set; reports the bound addresses once listening."""
        settings = self.settings
        file_storage = None
        storage_dirs = [settings.core.libraries.databases_dir]
        if settings.files_dir is not None:
            file_storage = LocalFileStorage(
                settings.files_dir, settings.files_public_url,
                slot_of=slot_of if self.cluster is not None else None,
            )
            storage_dirs.append(file_storage.root)
        for directory in storage_dirs:
            await trio.to_thread.run_sync(partial(directory.mkdir, parents=True, exist_ok=True))
        # Held while this process may open shards there: `verdant-trio restore` refuses to
        # replace files under a running daemon, and a second daemon on the same directory
        # refuses to start (DirectoryBusy is an OSError: "cannot serve", exit status 1).
        directory_lock = DirectoryLock(
            settings.core.libraries.databases_dir, "verdant-trio daemon"
        )
        await trio.to_thread.run_sync(directory_lock.acquire)
        try:
            async with open_core(
                settings.core,
                token_secret=settings.token_secret,
                profiles=self.profiles,
                observer=self.observer or NULL_OBSERVER,
                file_storage=file_storage,
                owns=self.cluster.owns if self.cluster is not None else owns_everything,
            ) as core, trio.open_nursery() as cluster_nursery:
                self.core = core
                if self.observer is not None:
                    self.observer.track_memory_budget(core.message_budget)
                asgi = create_asgi_app(core, settings.app)
                self.health = register_health(
                    asgi.quart, core, health=Health(core, storage_dirs), metrics=self.observer
                )
                self.hooks.install(asgi.quart)

                async def shutdown_trigger() -> None:
                    await shutdown.wait()
                    log.info("shutting down: closing connections")
                    core.begin_shutdown()

                if self.cluster is not None:  # lives as long as the listeners (below)
                    self.cluster.on_change = core.ownership_changed
                    await cluster_nursery.start(self.cluster.run, core)
                    await self._start_internal(cluster_nursery, core, file_storage, shutdown)

                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    listeners = Listeners(
                        asgi,
                        hypercorn_config(settings),
                        is_sync_path=asgi.is_sync_path,
                        sync_socket=asgi.stream_socket,
                        budget=core.message_budget,
                        budget_wait_s=settings.core.message_memory_wait_s,
                        linger=settings.linger,
                    )
                    binds = await nursery.start(
                        partial(listeners.serve, shutdown_trigger=shutdown_trigger)
                    )
                    self.health.listening = True
                    log.info("listening on %s", " ".join(binds))
                    task_status.started(binds)
                self.health.listening = False
                cluster_nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            directory_lock.release()
            await _close_source(self.profiles.source)
        log.info("stopped: every library closed")

    async def _start_internal(
        self,
        nursery: trio.Nursery,
        core: VerdantCore,
        file_storage: LocalFileStorage | None,
        shutdown: trio.Event,
    ) -> None:
        """The node-to-node listener (moving slots), if `[cluster] internal_port` is set."""
        cluster, node = self.settings.cluster, self.cluster
        if cluster is None or node is None or cluster.internal_port is None:
            return
        assert cluster.secret is not None  # the config requires it with internal_port
        self.transfers = Transfers(
            node, core, secret=cluster.secret, placement_file=cluster.placement_file,
            databases_dir=self.settings.core.libraries.databases_dir,
            files_root=file_storage.root if file_storage is not None else None,
            lease_s=cluster.move_timeout_s,
        )
        await nursery.start(partial(
            serve_internal, self.transfers, secret=cluster.secret, host=cluster.internal_host,
            port=cluster.internal_port, shutdown=shutdown,
            graceful_timeout_s=self.settings.graceful_timeout_s,
        ))

    def reload(self, new: LoadedConfig, old: LoadedConfig) -> list[tuple[str, str]]:
        """Apply the reloadable part of `new`; returns the changed keys that need a restart."""
        changed = new.changed_keys(old)
        settings = new.settings
        logs.configure(settings.logging, secrets=settings.secrets)
        self.hooks.access_log = settings.logging.access_log
        if self.settings.profiles is None and any(key[0] == "profiles" for key in changed):
            ps = settings.profile_settings
            previous = self.profiles.reconfigure(
                profile_source(ps),
                ttl_s=ps.cache_ttl_s,
                timeout_s=ps.timeout_s,
                max_entries=ps.cache_max_entries,
            )
            if self._nursery is not None:
                # Closed in the server's nursery (the one the listeners run in, which `serve`
                # keeps in `_nursery`), once lookups already holding it have timed out.
                self._nursery.start_soon(
                    _close_source, previous, old.settings.profile_settings.timeout_s
                )
        self._reload_cluster(new)
        # everything else keeps running with the settings it started with
        return [key for key in changed if key not in _RELOADABLE]

    def _reload_cluster(self, new: LoadedConfig) -> None:
        """Apply the re-read placement table (every SIGHUP: the table is its own file)."""
        cluster = new.settings.cluster
        if self.cluster is None or cluster is None or cluster.node_id != self.cluster.node_id:
            return  # [cluster] added, removed or renamed: reported as needing a restart
        self.cluster.peers = dict(cluster.peers)
        try:
            self.cluster.update(cluster.placement)
        except PlacementRefused as exc:
            log.error(
                "placement table not applied; keeping the running one file=%s version=%d "
                "problem=%s",
                cluster.placement_file, self.cluster.placement.version, exc,
            )


async def run_daemon(
    settings: ServerSettings,
    *,
    reload: Callable[[], LoadedConfig] | None = None,
    loaded: LoadedConfig | None = None,
    notifier: SystemdNotifier | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a `Server` until SIGTERM/SIGINT, telling systemd; SIGHUP calls `reload()`."""
    notifier = notifier or SystemdNotifier.from_environment()
    server = Server(settings)
    shutdown = trio.Event()
    force = trio.CancelScope()
    current = loaded

    async def force_after(delay_s: float) -> None:
        await trio.sleep(delay_s)
        log.error(
            "shutdown is taking too long: cancelling requests in flight timeout_s=%.1f", delay_s
        )
        force.cancel()

    async def handle_signals(
        nursery: trio.Nursery, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        nonlocal current
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()  # from here on a signal during start-up is ours to handle
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if shutdown.is_set():
                        continue
                    current = await _reload(server, reload, current, notifier)
                elif not shutdown.is_set():
                    log.info("received %s: shutting down", name)
                    shutdown.set()
                    await notifier.stopping("shutting down")
                    nursery.start_soon(
                        force_after, server.settings.graceful_timeout_s + SHUTDOWN_EXTRA_S
                    )
                else:
                    log.warning("received %s again: cancelling requests in flight", name)
                    force.cancel()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(handle_signals, nursery)

            async def serve_then_stop(*, task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    with force:
                        await server.serve(shutdown=shutdown, task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()  # the signal watcher and the watchdog

            binds = await nursery.start(serve_then_stop)
            task_status.started(binds)
            if not shutdown.is_set():  # a signal during start-up: systemd heard STOPPING=1
                await notifier.ready(f"listening on {' '.join(binds)}")
                assert server.health is not None
                nursery.start_soon(notifier.run_watchdog, server.health.healthy)
    finally:
        notifier.close()


async def _reload(
    server: Server,
    reload: Callable[[], LoadedConfig] | None,
    current: LoadedConfig | None,
    notifier: SystemdNotifier,
) -> LoadedConfig | None:
    if reload is None or current is None:
        log.info("received SIGHUP: nothing to reload (no configuration file)")
        return current
    await notifier.reloading()
    try:
        new = await trio.to_thread.run_sync(reload)  # file I/O and imports stay off the loop
    except ConfigError as exc:
        for problem in exc.problems:
            log.error(
                "reload failed; keeping the running settings file=%s problem=%s",
                exc.source, problem,
            )
        await notifier.ready("reload failed; running with the previous settings")
        return current
    restart = server.reload(new, current)
    log.info(
        "configuration reloaded file=%s level=%s format=%s",
        new.settings.config_path, new.settings.logging.level, new.settings.logging.format,
    )
    if restart:
        log.warning(
            "changed settings take effect after a restart keys=%s",
            ",".join(f"[{section}]{name}" for section, name in restart),
        )
    await notifier.ready("listening; configuration reloaded")
    # a reload that left some changes pending reports the new file as current, so the warning
    # is not repeated for the same changes at the next SIGHUP
    return new


async def serve(
    settings: ServerSettings,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown` is set (tests and tools that bring their own trigger)."""
    await Server(settings).serve(shutdown=shutdown, task_status=task_status)


async def run_until_signalled(
    settings: ServerSettings,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve` with SIGINT/SIGTERM as the shutdown trigger (the quickstart server)."""
    await run_daemon(settings, task_status=task_status)
